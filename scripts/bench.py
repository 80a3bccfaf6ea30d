#!/usr/bin/env python3
"""Benchmark `awqpad pad` / `awqpad verify` against a plain `cp -r` of the same checkpoint.

Generates a synthetic AWQ-GEMM checkpoint with realistic Qwen2-72B layer shapes (hidden 8192,
intermediate 29568 = 231 groups of 128, which does not split at TP 2, 4 or 8) at two sizes (by layer count),
then times, in the same run and alternating: `cp -r SRC DST`, `cp -r SRC DST && sync` (a copy that is
on disk, as `pad`'s fsynced output is), `awqpad pad SRC OUT --tp N`, `awqpad verify SRC OUT --layers none`
(the streamed static checks) and the full `awqpad verify SRC OUT`, and records each process's peak RSS
(wait4 rusage).

    python scripts/bench.py --workdir /tmp/awqpad-bench --layers 4 16 --repeat 3
    python scripts/bench.py --case fp8-moe --layers 4 --tp 4   # block-FP8 MoE, Qwen3-30B-A3B-FP8 shapes

The fp8-moe case has 128 experts per layer (768 x 2048 F8_E4M3 weights + [6, 16] F32 scales each): many
small tensors, the layout where per-tensor overhead shows; TP 4 pads the experts 768 -> 1024.

Data are pseudo-random bytes (a 64 MB random block repeated): the file system cannot tell the difference.
Page-cache state is whatever the machine has (warm after the first run); numbers are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from awqpad.checkpoint.header import encode_header  # noqa: E402

# Qwen2-72B layer shapes (29568 = 231 groups: not whole groups per rank at TP 2/4/8), smaller vocab.
HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB, GROUP = 8192, 29568, 64, 8, 128, 32000, 128
BLOCK = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()


def _tensors(layers: int):
    def awq(prefix, k, n):
        return [(f"{prefix}.qweight", "I32", (k, n // 8)), (f"{prefix}.qzeros", "I32", (k // GROUP, n // 8)),
                (f"{prefix}.scales", "F16", (k // GROUP, n))]

    out = [("model.embed_tokens.weight", "F16", (VOCAB, HIDDEN))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += awq(f"{p}.self_attn.q_proj", HIDDEN, HEADS * HEAD_DIM) + [(f"{p}.self_attn.q_proj.bias", "F16", (HEADS * HEAD_DIM,))]
        out += awq(f"{p}.self_attn.k_proj", HIDDEN, KV * HEAD_DIM) + [(f"{p}.self_attn.k_proj.bias", "F16", (KV * HEAD_DIM,))]
        out += awq(f"{p}.self_attn.v_proj", HIDDEN, KV * HEAD_DIM) + [(f"{p}.self_attn.v_proj.bias", "F16", (KV * HEAD_DIM,))]
        out += awq(f"{p}.self_attn.o_proj", HEADS * HEAD_DIM, HIDDEN)
        out += awq(f"{p}.mlp.gate_proj", HIDDEN, INTER) + awq(f"{p}.mlp.up_proj", HIDDEN, INTER) + awq(f"{p}.mlp.down_proj", INTER, HIDDEN)
        out += [(f"{p}.input_layernorm.weight", "F16", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", "F16", (HIDDEN,))]
    out += [("model.norm.weight", "F16", (HIDDEN,)), ("lm_head.weight", "F16", (VOCAB, HIDDEN))]
    return out


# Qwen3-30B-A3B-FP8 shapes: block-FP8 [128, 128], 128 experts of width 768 (6 blocks: 1.5 per rank at TP 4).
MOE_HIDDEN, MOE_INTER, MOE_EXPERTS, MOE_HEADS, MOE_KV, MOE_VOCAB, FP8_BLOCK = 2048, 768, 128, 32, 4, 32000, 128


def _tensors_fp8_moe(layers: int):
    def fp8(prefix, n, k):
        return [(f"{prefix}.weight", "F8_E4M3", (n, k)), (f"{prefix}.weight_scale_inv", "F32", (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)))]

    h, d = MOE_HIDDEN, 128
    out = [("model.embed_tokens.weight", "BF16", (MOE_VOCAB, h))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += fp8(f"{p}.self_attn.q_proj", MOE_HEADS * d, h) + fp8(f"{p}.self_attn.k_proj", MOE_KV * d, h)
        out += fp8(f"{p}.self_attn.v_proj", MOE_KV * d, h) + fp8(f"{p}.self_attn.o_proj", h, MOE_HEADS * d)
        out += [(f"{p}.self_attn.q_norm.weight", "BF16", (d,)), (f"{p}.self_attn.k_norm.weight", "BF16", (d,))]
        out += [(f"{p}.mlp.gate.weight", "BF16", (MOE_EXPERTS, h))]
        for e in range(MOE_EXPERTS):
            q = f"{p}.mlp.experts.{e}"
            out += fp8(f"{q}.gate_proj", MOE_INTER, h) + fp8(f"{q}.up_proj", MOE_INTER, h) + fp8(f"{q}.down_proj", h, MOE_INTER)
        out += [(f"{p}.input_layernorm.weight", "BF16", (h,)), (f"{p}.post_attention_layernorm.weight", "BF16", (h,))]
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (MOE_VOCAB, h))]
    return out


FP8_MOE_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": MOE_HIDDEN,
                  "moe_intermediate_size": MOE_INTER, "num_experts": MOE_EXPERTS, "num_attention_heads": MOE_HEADS,
                  "num_key_value_heads": MOE_KV, "head_dim": 128, "vocab_size": MOE_VOCAB, "intermediate_size": 6144,
                  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}}


def _nbytes(dtype, shape):
    return int(np.prod(shape)) * {"F16": 2, "BF16": 2, "I32": 4, "F32": 4, "F8_E4M3": 1}[dtype]


def make_checkpoint(path: Path, layers: int, shard_bytes: int = 2 << 30, case: str = "awq") -> int:
    path.mkdir(parents=True)
    shards, current, size = [], [], 0
    for name, dtype, shape in (_tensors_fp8_moe if case == "fp8-moe" else _tensors)(layers):
        n = _nbytes(dtype, shape)
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape, n))
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(path / fname, "wb") as fh:
            fh.write(encode_header(tensors, {"format": "pt"}))
            remaining = sum(t[3] for t in tensors)
            while remaining:
                chunk = BLOCK[: min(len(BLOCK), remaining)]
                fh.write(chunk)
                remaining -= len(chunk)
        for name, _, _, n in tensors:
            weight_map[name] = fname
            total += n
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(FP8_MOE_CONFIG, num_hidden_layers=layers) if case == "fp8-moe" else {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN, "intermediate_size": INTER,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
              "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}}
    if case == "fp8-moe":  # random bytes include e4m3fn NaN codes (0x7F / 0xFF): map them to finite values
        _scrub_fp8_nan(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return sum(f.stat().st_size for f in path.iterdir())


def _scrub_fp8_nan(path: Path) -> None:
    """Random bytes hold e4m3fn NaN codes (pad refuses them next to the padding, verify would compare NaN):
    rewrite every code to a finite one (0x7F -> 0x7E, 0xFF -> 0xFE) and every block scale to 1e-3, in place."""
    from awqpad.checkpoint.header import read_header

    for shard in sorted(path.glob("*.safetensors")):
        header = read_header(shard, shard.name)
        with open(shard, "r+b") as fh:
            for info in header.tensors.values():
                if info.name.endswith(".weight_scale_inv"):  # random F32 bits can be NaN / inf: a sane scale
                    fh.seek(info.begin)
                    fh.write(np.full(info.shape, 1e-3, "<f4").tobytes())
                if info.dtype != "F8_E4M3":
                    continue
                fh.seek(info.begin)
                raw = np.frombuffer(fh.read(info.nbytes), np.uint8).copy()
                raw[(raw & 0x7F) == 0x7F] -= 1
                fh.seek(info.begin)
                fh.write(raw.tobytes())


def timed(cmd: list[str], random_data_verify: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, RSS as GNU time reports it for the process itself
    (rusage of a child forked from this script would count this script's own memory).
    random_data_verify: `cmd` is a full `verify --json` of the random-bytes checkpoint, whose fp16 values are
    mostly NaN/inf: its function checks rightly fail as "not compared" (exit 1); every other check must pass."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, stdout=subprocess.PIPE if random_data_verify
                          else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    ok = proc.returncode == 0
    if random_data_verify and proc.returncode == 1:
        failed = [c for c in json.loads(proc.stdout)["checks"] if not c["ok"]]
        ok = all(c["name"].startswith("function TP=") and c["detail"].startswith("not compared") for c in failed)
    if not ok:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/awqpad-bench"))
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--case", choices=("awq", "fp8-moe"), default="awq",
                    help="awq: Qwen2-72B AWQ shapes; fp8-moe: Qwen3-30B-A3B block-FP8 MoE shapes")
    args = ap.parse_args()
    awqpad = [sys.executable, "-m", "awqpad"]
    results = []
    for layers in args.layers:
        root = args.workdir / f"L{layers}"
        shutil.rmtree(root, ignore_errors=True)
        src, dst, out = root / "src", root / "cp", root / "out"
        size = make_checkpoint(src, layers, case=args.case)
        runs = {"cp": [], "cp_sync": [], "pad": [], "verify_static": [], "verify": []}
        for _ in range(args.repeat):
            # every command starts from an empty destination and a clean page-cache writeback state
            for key, cmd in (("cp", ["cp", "-r", str(src), str(dst)]),
                             ("cp_sync", ["sh", "-c", f"cp -r '{src}' '{dst}' && sync"]),
                             ("pad", awqpad + ["pad", str(src), str(out), "--tp", str(args.tp), "--quiet"])):
                shutil.rmtree(dst, ignore_errors=True)
                if key == "pad":
                    shutil.rmtree(out, ignore_errors=True)
                os.sync()
                runs[key].append(timed(cmd))
            if not args.no_verify:
                runs["verify_static"].append(timed(awqpad + ["verify", str(src), str(out), "--layers", "none", "--quiet"]))
                runs["verify"].append(timed(awqpad + ["verify", str(src), str(out), "--json"], random_data_verify=True))
        med = {k: (statistics.median(w for w, _ in v), max(r for _, r in v)) for k, v in runs.items() if v}
        row = {"case": args.case, "layers": layers, "gb": round(size / 1e9, 2), "cp_s": round(med["cp"][0], 2),
               "cp_sync_s": round(med["cp_sync"][0], 2), "pad_s": round(med["pad"][0], 2),
               "pad_over_cp": round(med["pad"][0] / med["cp"][0], 3),
               "pad_over_cp_sync": round(med["pad"][0] / med["cp_sync"][0], 3), "pad_peak_rss_mb": round(med["pad"][1], 1)}
        if "verify" in med:
            row.update(verify_static_s=round(med["verify_static"][0], 2),
                       verify_static_over_cp=round(med["verify_static"][0] / med["cp"][0], 3),
                       verify_s=round(med["verify"][0], 2), verify_over_cp=round(med["verify"][0] / med["cp"][0], 3),
                       verify_peak_rss_mb=round(med["verify"][1], 1))
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
