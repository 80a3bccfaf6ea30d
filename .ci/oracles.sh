#!/usr/bin/env bash
# Install the tier-1 "oracle" packages (third-party reference code that judges awqpad's output)
# into the CURRENT python environment, without ever replacing torch.
#
#   bash .ci/oracles.sh            # uses $PYTHON, else `python`
#
# What it installs (all pinned, verified on CPython 3.11 + torch 2.13.0+cpu, 2 cores, AVX2):
#   compressed-tensors 0.20.0   (PackedQuantizationCompressor.decompress)
#   transformers 5.23.0, accelerate 1.15.0, optimum 2.3.0   (AutoModelForCausalLM on AWQ/GPTQ)
#   gptqmodel 7.7.0  --no-deps  (+ its requirements.txt minus its `torch>=2.14.1` line):
#                    transformers' AWQ/GPTQ backend, GPTQ dequant, and the real GPTQ quantizer
#   autoawq 0.2.9    --no-deps  (pure python; the tests load awq/utils/packing_utils.py by path)
#   auto-gptq 0.7.1: NOT installed (its wheel ships a top-level `tests` package that would shadow this
#                    repo's tests/, and CUDA-only extensions); `pip download` fetches the wheel and only
#                    auto_gptq/nn_modules/qlinear/qlinear_cuda{,_old}.py (pure torch fallback paths) are
#                    extracted to .cache/oracles/auto_gptq-0.7.1/ (git-ignored) for the tests to load by path.
# Everything runs under a constraint `torch==<the torch already installed>` (2.13.0 if none is),
# so pip can never pull a CUDA torch.  Idempotent: a second run only checks versions (~1 s).
set -euo pipefail

PY="${PYTHON:-python}"
TORCH_WANT="${AWQPAD_TORCH_VERSION:-2.13.0}"

# --- exact pins --------------------------------------------------------------------------
PINNED=(
  "transformers==5.23.0"
  "accelerate==1.15.0"
  "optimum==2.3.0"
  "compressed-tensors==0.20.0"
)
NODEPS=(
  "gptqmodel==7.7.0"
  "autoawq==0.2.9"
)
# gptqmodel 7.7.0 requirements.txt (python >= 3.11 markers resolved), WITHOUT `torch>=2.14.1`.
# gptqmodel runs fine on torch 2.13 for what we use (CPU torch kernels, GPTQ quantizer).
GPTQMODEL_REQS=(
  "numpy>=2.4.6"
  "safetensors>=0.8.0"
  "filelock>=4.2.4"
  "threadpoolctl>=3.7.0"
  "packaging>=26.3"
  "device-smi>=0.5.7"
  "protobuf>=7.36.2"
  "pillow>=13.0.0"
  "requests>=2.34.2"
  "pypcre>=0.6.4"
  "tokenicer>=0.0.14"
  "logbar>=0.4.15"
  "jinja2>=3.1.6"
  "ninja>=1.13.2"
  "maturin>=1.15.0"
  "datasets>=5.1.0"
  "pyarrow>=26.0.0"
  "dill>=0.4.1"
  "torchao==0.18.0"
  "defuser>=0.0.28"
)

say() { printf '[oracles] %s\n' "$*" >&2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AUTOGPTQ_VERSION=0.7.1
AUTOGPTQ_DIR="${AWQPAD_AUTOGPTQ_DIR:-$ROOT/.cache/oracles/auto_gptq-$AUTOGPTQ_VERSION}"
# pip, minus the local-index "Location ... is ignored" noise of this machine's pip config
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# --- AutoGPTQ's reference readers: two source files out of the registry's wheel ---------------
fetch_autogptq() {
  [[ -f "$AUTOGPTQ_DIR/qlinear_cuda.py" && -f "$AUTOGPTQ_DIR/qlinear_cuda_old.py" ]] && return 0
  local tmp
  tmp="$(mktemp -d)"
  pipq download --quiet --no-deps --only-binary :all: -d "$tmp" "auto-gptq==$AUTOGPTQ_VERSION"
  mkdir -p "$AUTOGPTQ_DIR"
  "$PY" - "$tmp" "$AUTOGPTQ_DIR" <<'PYEOF'
import glob, sys, zipfile, pathlib
(whl,) = glob.glob(sys.argv[1] + "/auto_gptq-*.whl")
out = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    for name in ("qlinear_cuda.py", "qlinear_cuda_old.py"):
        (out / name).write_bytes(z.read(f"auto_gptq/nn_modules/qlinear/{name}"))
(out / "SOURCE").write_text(f"extracted from {pathlib.Path(whl).name} (PyPI) by .ci/oracles.sh\n")
PYEOF
  rm -rf "$tmp"
  say "AutoGPTQ $AUTOGPTQ_VERSION qlinear sources -> $AUTOGPTQ_DIR"
}

# --- fast path: everything already at the pinned versions? --------------------------------
fetch_autogptq
if "$PY" - "$TORCH_WANT" "${PINNED[@]}" "${NODEPS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
torch_want, pins = sys.argv[1], sys.argv[2:]
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return None
tv = v("torch") or ""
ok = tv.split("+")[0] == torch_want
for p in pins:
    name, want = p.split("==")
    ok = ok and v(name) == want
for n in ("datasets", "torchao", "defuser", "logbar", "tokenicer", "device-smi", "pypcre"):
    ok = ok and v(n) is not None
sys.exit(0 if ok else 1)
EOF
then
  say "oracle packages already installed (torch $TORCH_WANT); nothing to do"
  exit 0
fi

t0=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- torch: keep the installed one; install the local CPU wheel if there is none ----------
TORCH_HAVE="$("$PY" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true)"
if [[ -z "$TORCH_HAVE" ]]; then
  say "no torch in this environment: installing torch==$TORCH_WANT"
  pipq install --quiet "torch==$TORCH_WANT"
  TORCH_HAVE="$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
fi
TORCH_BASE="${TORCH_HAVE%%+*}"
if [[ "$TORCH_BASE" != "$TORCH_WANT" ]]; then
  say "WARNING: torch $TORCH_HAVE is installed, expected $TORCH_WANT; keeping it (constraint torch==$TORCH_BASE)"
fi
printf 'torch==%s\n' "$TORCH_BASE" > "$WORK/constraints.txt"

# --- one resolver transaction for everything that has honest metadata ---------------------
say "installing ${PINNED[*]} + gptqmodel requirements (constraint torch==$TORCH_BASE)"
pipq install --quiet -c "$WORK/constraints.txt" "${PINNED[@]}" "${GPTQMODEL_REQS[@]}"

# --- packages whose metadata asks for another torch (gptqmodel) or for CUDA-only extras ----
say "installing --no-deps ${NODEPS[*]}"
pipq install --quiet --no-deps -c "$WORK/constraints.txt" "${NODEPS[@]}"

# --- verify: torch unchanged, oracles import ----------------------------------------------
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
"$PY" - "$TORCH_HAVE" <<'EOF'
import sys, warnings
warnings.filterwarnings("ignore")
import torch
assert torch.__version__ == sys.argv[1], f"torch changed: {torch.__version__} != {sys.argv[1]}"
import transformers, accelerate, optimum, compressed_tensors
from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: F401
import gptqmodel  # noqa: F401
import importlib.util
spec = importlib.util.find_spec("awq")
assert spec is not None and spec.submodule_search_locations, "autoawq not installed"
print(f"[oracles] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}, gptqmodel {gptqmodel.__version__}",
      file=sys.stderr)
EOF
say "done in $((SECONDS - t0)) s"
