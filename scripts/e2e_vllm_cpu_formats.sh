#!/usr/bin/env bash
# Tier 2, FP8 / FP4 formats: vLLM (CPU build, 0.32.0) with real tensor parallelism on awqpad-padded
# block-FP8, NVFP4 and compressed-tensors FP8 per-channel checkpoints. Companion of
# scripts/e2e_vllm_cpu.sh (which owns the venv and the int4 checks).
#
#   bash scripts/e2e_vllm_cpu_formats.sh                  # exit 0 only if every check passed
#   E2E_FORMATS="fp8-block" bash scripts/e2e_vllm_cpu_formats.sh
#   E2E_FORMATS="fp8-block nvfp4 ct-fp8-channel" E2E_PADDED_TPS="2 4" bash scripts/e2e_vllm_cpu_formats.sh  # all
#
# Env: PYTHON, AWQPAD_VLLM_VENV as in scripts/e2e_vllm_cpu.sh; E2E_RUN_TIMEOUT (s per run, 600); AWQPAD_E2E_WORK
# (default .cache/e2e-vllm-formats), E2E_FORMATS (default "fp8-block nvfp4"; ct-fp8-channel on
# request), E2E_PADDED_TPS (TPs of the padded runs, default "4": the strictest split, and CI time is
# short; the checkpoints are padded for TP 2 and 4 either way), E2E_LOGPROB_TOL (0.01),
# E2E_DRIFT_FACTOR (2). Default: 9 vLLM runs.
#
# What runs, per format (tiny dense models, 2 layers, dtype bfloat16 (vLLM refuses float32 for fp8), greedy, 3 prompts x 8 tokens):
#   fp8-block      `quant_method: fp8`, weight_block_size [128, 128], Qwen3 (tests/fp8_factory.py):
#                  intermediate 640 = 5 blocks (2.5 per rank at TP 2, 1.25 at TP 4: vLLM's
#                  validate_fp8_block_shape refuses it), padded by `awqpad pad --tp 2 --tp 4` (1024);
#                  control: intermediate 512 (whole blocks per rank at TP 4, no padding).
#   nvfp4          compressed-tensors nvfp4-pack-quantized (W4A4), Qwen2 (tests/factory_fp4.py):
#                  intermediate 464 = 29 groups of 16, padded likewise (512); control: 512.
#   ct-fp8-channel compressed-tensors FP8, per-channel weights + dynamic per-token activations:
#                  needs no padding at any TP (`awqpad plan --tp 2 --tp 4` must agree); run unpadded at
#                  TP 1 and 4 - it is its own control. This is the one path with vLLM's own CPU GEMM
#                  (ChannelWiseTorchFP8ScaledMMLinearKernel, torch._scaled_mm).
#   Block-FP8 and NVFP4 have no CPU GEMM in vllm-cpu 0.32.0 on CPUs without AMX; the test-only plugin
#   tests/e2e/vllm_cpu_quant_fallback (AWQPAD_CPU_QUANT_FALLBACK=1) supplies "dequantize the rank's
#   shard, then matmul" for block-FP8 and registers vLLM's own EmulationNvFp4LinearKernel for NVFP4.
#   int4 MoE is not run: see README "Third-party checks".
#   STATUS: on tests/factory_fp4.py's checkpoint vLLM's NVFP4 emulation gives NaN log-probs already for
#   the UNPADDED model at TP 1 (see README); until that is traced, nvfp4 fails here, so this script
#   is not in .ci/run yet.
#
# The rule (tests/e2e/vllm_driver.py `judge`, pinned by tests/test_e2e_compare.py). vLLM at TP > 1 is
# not bit-identical to TP 1 even without padding (other reduction order; W8A8 quantizes each rank's
# activation slice with its own scale), so exact token equality is the wrong bar. Per padded run at
# TP n in E2E_PADDED_TPS, with drift = first-step log-prob gap between the control at TP 1 and at TP 4:
#   allow = E2E_LOGPROB_TOL + E2E_DRIFT_FACTOR x drift;
#   1. padded TP n vs unpadded TP 1: greedy tokens identical (a later flip only as a tie within allow)
#      and every first-step log-prob (chosen token + shared top-5) within allow;
#   2. fp64: gap(fp64, padded TP n) - gap(fp64, unpadded TP 1) <= E2E_LOGPROB_TOL + E2E_DRIFT_FACTOR x
#      |gap(fp64_c, control TP 4) - gap(fp64_c, control TP 1)|, where fp64 / fp64_c
#      (tests/e2e/fp64_reference.py) run the unpadded / control checkpoint's dequantized weights in
#      float64: padding must move vLLM no further from the exact function than TP moves the control.
# The control itself is reported (drift, and its TP 4 run against its own fp64 reference) and must run.
# A negative control (fp8-block, padded checkpoint with its zero gate/up rows moved to the front,
# so the zero down_proj columns no longer meet them) must FAIL the same judge at TP 4.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
CACHE="${AWQPAD_E2E_CACHE:-$ROOT/.cache}"
VENV="${AWQPAD_VLLM_VENV:-$CACHE/vllm-cpu-venv}"
WORK="${AWQPAD_E2E_WORK:-$CACHE/e2e-vllm-formats}"
FORMATS="${E2E_FORMATS:-fp8-block nvfp4}"
PADDED_TPS="${E2E_PADDED_TPS:-4}"
TOL="${E2E_LOGPROB_TOL:-0.01}"
FACTOR="${E2E_DRIFT_FACTOR:-2}"
RUN_TIMEOUT="${E2E_RUN_TIMEOUT:-600}"
T0=$SECONDS
log() { printf '[e2e-formats %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
pipq() { local py=$1; shift; "$py" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# 1. the venv (made or reused by the int4 script), plus this script's plugin
AWQPAD_VLLM_VENV="$VENV" AWQPAD_E2E_CACHE="$CACHE" E2E_INSTALL_ONLY=1 bash "$ROOT/scripts/e2e_vllm_cpu.sh"
VPY="$VENV/bin/python"
PLUGIN_SRC="$(mktemp -d)"
cp -r "$ROOT/tests/e2e/vllm_cpu_quant_fallback" "$PLUGIN_SRC/"
pipq "$VPY" install -q --no-deps --force-reinstall --no-build-isolation "$PLUGIN_SRC/vllm_cpu_quant_fallback" >/dev/null
rm -rf "$PLUGIN_SRC"
export AWQPAD_CPU_QUANT_FALLBACK=1

# Block-FP8 support (awqpad's format and tests/fp8_factory.py) may land after this script: until then
# the FP8 formats are skipped with a SKIP line (never silently; and a run that compares nothing fails).
declare -a SKIPS=()
if [[ ! -f "$ROOT/tests/fp8_factory.py" ]]; then
  for f in fp8-block ct-fp8-channel; do
    if [[ " $FORMATS " == *" $f "* ]]; then SKIPS+=("SKIP  $f: tests/fp8_factory.py is not in this tree (FP8 support not landed)"); fi
  done
  FORMATS="$(printf '%s\n' $FORMATS | grep -v -x -e fp8-block -e ct-fp8-channel | paste -sd' ' - || true)"
fi

# 2. checkpoints (project env): made by the test factories, planned and padded by awqpad (its own
#    `verify` of these formats is tested in the pytest suite; this script asks only the engine)
rm -rf "$WORK"
mkdir -p "$WORK"
"$PY" - "$ROOT" "$WORK" "$FORMATS" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
work, formats = Path(sys.argv[2]), sys.argv[3].split()
if "fp8-block" in formats or "ct-fp8-channel" in formats:
    from tests.fp8_factory import Spec, build_fp8
    qwen3 = dict(arch="qwen3", hidden=256, heads=4, kv_heads=2, head_dim=128, vocab=320)
    if "fp8-block" in formats:
        build_fp8(work / "fp8-block", Spec(flavour="block", intermediate=640, **qwen3), shards=1, seed=1)
        build_fp8(work / "fp8-block-control", Spec(flavour="block", intermediate=512, **qwen3), shards=1, seed=2)
    if "ct-fp8-channel" in formats:
        build_fp8(work / "ct-fp8-channel", Spec(flavour="ct-channel", intermediate=640, **qwen3), shards=1, seed=3)
if "nvfp4" in formats:
    from tests.factory_fp4 import Fp4Model, build_nvfp4
    qwen2 = dict(arch="qwen2", hidden=512, heads=8, kv_heads=2, head_dim=64, vocab=320)
    build_nvfp4(work / "nvfp4", Fp4Model(intermediate=464, **qwen2), "ct", shards=1, seed=1)
    build_nvfp4(work / "nvfp4-control", Fp4Model(intermediate=512, **qwen2), "ct", shards=1, seed=2)
EOF
declare -a RESULTS=()
FAILED=0
fail() { RESULTS+=("FAIL  $*"); FAILED=1; }
plan_clean() {  # dir: awqpad plan says TP 2 and 4 need no padding and nothing blocks them
  "$PY" -m awqpad plan "$1" --tp 2 --tp 4 --json | "$PY" -c \
      'import json, sys; d = json.load(sys.stdin); sys.exit(1 if d["needs_padding"] or d["blocked"] else 0)'
}
width() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['intermediate_size'])" "$1/config.json"; }
for f in $FORMATS; do
  case $f in
    fp8-block|nvfp4)
      "$PY" -m awqpad pad "$WORK/$f" "$WORK/$f-padded" --tp 2 --tp 4 -q
      log "$f: intermediate_size $(width "$WORK/$f") -> $(width "$WORK/$f-padded")"
      # the control must need no padding at TP 4 (else it measures nothing but padding)
      plan_clean "$WORK/$f-control" || fail "$f control: awqpad plan says it needs padding at TP 2/4"
      plan_clean "$WORK/$f" && fail "$f: awqpad plan says the unpadded model needs no padding (nothing to test)"
      ;;
    ct-fp8-channel)
      plan_clean "$WORK/$f" || fail "$f: awqpad plan says it needs padding at TP 2/4"
      ;;
    *) echo "unknown format in E2E_FORMATS: $f" >&2; exit 2 ;;
  esac
done
if [[ " $FORMATS " == *" fp8-block "* ]]; then
  # negative control: the padded tensors with gate/up's zero rows (whole blocks, with their scales)
  # moved to the front, down_proj as padded: a pure layout error
  cp -r "$WORK/fp8-block-padded" "$WORK/fp8-block-misplaced"
  "$PY" - "$WORK/fp8-block-misplaced" "$(width "$WORK/fp8-block")" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
d, real = Path(sys.argv[1]), int(sys.argv[2])
(shard,) = d.glob("*.safetensors")
raw = shard.read_bytes()
n = int.from_bytes(raw[:8], "little")
header, body = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
moved = 0
for name, e in header.items():
    leaf = name.split(".", 3)[-1] if name != "__metadata__" else ""
    if leaf not in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.weight_scale_inv",
                    "mlp.up_proj.weight_scale_inv"):
        continue
    a, b = e["data_offsets"]
    rows, cols = e["shape"]
    item = (b - a) // (rows * cols)
    w = np.frombuffer(bytes(body[a:b]), np.uint8).reshape(rows, cols * item)
    # zero rows (and their whole blocks' scales of 1.0) first: 640 real rows = 5 whole blocks of 128
    k = real if leaf.endswith(".weight") else real // 128
    if leaf.endswith(".weight"):
        assert not w[real:].any(), f"{name}: expected awqpad's zero rows after row {real}"
    body[a:b] = np.concatenate([w[k:], w[:k]]).tobytes()
    moved += 1
assert moved == 8, moved
shard.write_bytes(raw[:8 + n] + bytes(body))
EOF
fi
log "checkpoints ready under $WORK"

# 3. vLLM runs (one process at a time; each under `timeout` in its own process group)
DRIVER="$ROOT/tests/e2e/vllm_driver.py"
RUN_PGID=""
end_run() {
  if [[ -n "$RUN_PGID" ]]; then
    kill -TERM -- "-$RUN_PGID" 2>/dev/null || true
    sleep 3
    kill -KILL -- "-$RUN_PGID" 2>/dev/null || true
  fi
}
trap end_run EXIT
trap 'end_run; exit 130' INT TERM
run_vllm() {  # name model tp
  local name=$1 model=$2 tp=$3 t=$SECONDS rc=0
  log "vLLM run '$name': tensor_parallel_size=$tp"
  timeout --kill-after=30 "$RUN_TIMEOUT" "$VPY" "$DRIVER" run --model "$model" --tp "$tp" --dtype bfloat16 \
      --out "$WORK/$name.json" > "$WORK/$name.log" 2>&1 &
  RUN_PGID=$!
  wait "$RUN_PGID" || rc=$?
  RUN_PGID=""
  if [[ $rc -ne 0 ]]; then
    log "run '$name' FAILED (exit $rc); last lines of $WORK/$name.log:"
    tail -n 30 "$WORK/$name.log" >&2
    fail "$name: vLLM run failed (exit $rc)"
  else
    log "run '$name' finished in $((SECONDS - t)) s"
  fi
}
fp64() { "$VPY" "$ROOT/tests/e2e/fp64_reference.py" --model "$WORK/$1" --out "$WORK/$1-fp64.json" || fail "$1: fp64 reference failed"; }
have() { local x; for x in "$@"; do [[ -f "$WORK/$x.json" ]] || return 1; done; }
judge() {  # label ref padded control_tp1 control fp64 control_fp64 expect(pass|fail)
  local label=$1 line rc=0
  have "$2" "$3" "$4" "$5" "$6" "$7" || { fail "$label: a run it needs failed"; return; }
  line="$("$VPY" "$DRIVER" judge --ref "$WORK/$2.json" --padded "$WORK/$3.json" --control-tp1 "$WORK/$4.json" \
      --control "$WORK/$5.json" --fp64 "$WORK/$6.json" --control-fp64 "$WORK/$7.json" --tol "$TOL" \
      --drift-factor "$FACTOR")" || rc=$?
  if [[ $8 == pass ]]; then
    if [[ $rc -eq 0 ]]; then RESULTS+=("PASS  $label: $line"); else fail "$label: $line"; fi
  elif [[ $rc -ne 0 ]]; then RESULTS+=("PASS  $label is told apart, as it must be: $line")
  else fail "$label was NOT told apart from the reference: $line"; fi
}
report_control() {  # label control_tp1 control fp64
  have "$2" "$3" "$4" || return 0
  RESULTS+=("INFO  $1 (no padding) tp1 vs tp4: $("$VPY" "$DRIVER" compare "$WORK/$2.json" "$WORK/$3.json" --tol "$TOL" || true)")
  RESULTS+=("INFO  $1 tp4 vs fp64: $("$VPY" "$DRIVER" compare "$WORK/$4.json" "$WORK/$3.json" --tol "$TOL" || true)")
}

for f in $FORMATS; do
  case $f in
    fp8-block|nvfp4)
      fp64 "$f"; fp64 "$f-control"
      run_vllm "$f-unpadded-tp1" "$WORK/$f" 1
      run_vllm "$f-control-tp1" "$WORK/$f-control" 1
      run_vllm "$f-control-tp4" "$WORK/$f-control" 4
      for tp in $PADDED_TPS; do run_vllm "$f-padded-tp$tp" "$WORK/$f-padded" "$tp"; done
      for tp in $PADDED_TPS; do
        judge "$f padded tp$tp" "$f-unpadded-tp1" "$f-padded-tp$tp" "$f-control-tp1" "$f-control-tp4" "$f-fp64" \
            "$f-control-fp64" pass
      done
      report_control "$f control" "$f-control-tp1" "$f-control-tp4" "$f-control-fp64"
      if [[ $f == fp8-block ]]; then
        run_vllm fp8-block-misplaced-tp4 "$WORK/fp8-block-misplaced" 4
        judge "fp8-block negative control (zero gate/up rows moved to the front) tp4" fp8-block-unpadded-tp1 \
            fp8-block-misplaced-tp4 fp8-block-control-tp1 fp8-block-control-tp4 fp8-block-fp64 fp8-block-control-fp64 fail
      fi
      ;;
    ct-fp8-channel)
      fp64 "$f"
      run_vllm "$f-tp1" "$WORK/$f" 1
      run_vllm "$f-tp4" "$WORK/$f" 4
      # no padding: the model is its own control, so the padded-run checks reduce to "TP 4 is as close
      # to fp64 as TP 1, within the tolerance plus its own drift" -- reported, and the runs must succeed
      report_control "$f" "$f-tp1" "$f-tp4" "$f-fp64"
      have "$f-tp1" "$f-fp64" && RESULTS+=("INFO  $f tp1 vs fp64: $("$VPY" "$DRIVER" compare "$WORK/$f-fp64.json" "$WORK/$f-tp1.json" --tol "$TOL" || true)")
      ;;
  esac
done

echo
echo "=== vLLM CPU end-to-end, FP8/FP4 formats ($FORMATS): padded TP $PADDED_TPS vs unpadded TP 1, allowance from a no-padding control's TP drift ==="
grep -h -o 'awqpad-cpu-quant-fallback pid=[0-9]*\] mode: .*' "$WORK"/*.log 2>/dev/null | sed 's/pid=[0-9]*\] //' | sort -u || true
grep -h -o 'Selected [A-Za-z0-9]* for [A-Za-z0-9]*\|Using [A-Za-z0-9]*Kernel for NVFP4 GEMM' "$WORK"/*.log 2>/dev/null | sort -u || true
for r in "${SKIPS[@]}" "${RESULTS[@]}"; do echo "$r"; done
npass=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS' || true)
nfail=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL' || true)
echo "total time $((SECONDS - T0)) s; logs and results in $WORK"
if [[ $FAILED -ne 0 || $npass -eq 0 ]]; then echo "E2E FORMATS FAIL"; FAILED=1; else echo "E2E FORMATS PASS"; fi
echo "e2e-formats: $npass passed, $nfail failed"
exit "$FAILED"
