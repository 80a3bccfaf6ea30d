"""Make a tiny Qwen2-shaped AWQ-GEMM checkpoint that vLLM refuses at TP 2 and 4 before padding.

    python -m awqpad.example example/tiny-qwen2-awq        # see --help

intermediate_size 2432 = 19 groups of 128, so each rank would get 9.5 (TP 2) or 4.75 (TP 4) groups.
Random weights, round-to-nearest quantized with zero points, packed exactly as AutoAWQ's GEMM layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from awqpad.checkpoint.formats.awq_gemm import AWQ_ORDER
from awqpad.checkpoint.header import encode_header

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, GROUP = 512, 2432, 2, 8, 4, 64, 320, 128


def _pack_awq(codes: np.ndarray) -> np.ndarray:
    """codes [R, N] in 0..15 -> int32 [R, N/8], AWQ slot order."""
    r, n = codes.shape
    slots = codes.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)].astype(np.uint32)
    words = np.zeros((r, n // 8), dtype=np.uint32)
    for i in range(8):
        words |= slots[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def _quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """w [out, in] float -> AWQ qweight/qzeros/scales (asymmetric, per group of inputs)."""
    wt = w.T  # [K, N]
    k, n = wt.shape
    grouped = wt.reshape(k // GROUP, GROUP, n)
    lo, hi = grouped.min(axis=1), grouped.max(axis=1)
    scales = np.maximum(hi - lo, 1e-5) / 15
    zeros = np.clip(np.round(-lo / scales), 0, 15)
    codes = np.clip(np.round(grouped / scales[:, None, :]) + zeros[:, None, :], 0, 15).reshape(k, n)
    return {"qweight": _pack_awq(codes.astype(np.int64)), "qzeros": _pack_awq(zeros.astype(np.int64)),
            "scales": scales.astype(np.float16)}


def make_example(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float16),
        "model.norm.weight": np.ones(HIDDEN, np.float16),
        "lm_head.weight": (rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float16),
    }
    shapes = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM),
              "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = np.ones(HIDDEN, np.float16)
        tensors[prefix + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float16)
        for name, shape in shapes.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"{prefix}{block}.{name}"
            for part, value in _quantize(rng.standard_normal(shape) * shape[1] ** -0.5).items():
                tensors[f"{module}.{part}"] = value
            if name in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{module}.bias"] = (rng.standard_normal(shape[0]) * 0.02).astype(np.float16)
    _save_sharded(path, tensors, shards=2)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                "version": "gemm", "modules_to_not_convert": None},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (path / "README.md").write_text("# tiny-qwen2-awq\n\nA random 2-layer Qwen2-shaped AWQ checkpoint made by `python -m awqpad.example`.\n")
    return path


def _dtype_name(a: np.ndarray) -> str:
    return {np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}[a.dtype]


def _save_sharded(path: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        chunk = names[i * per : (i + 1) * per]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        head = encode_header([(n, _dtype_name(tensors[n]), tensors[n].shape, tensors[n].nbytes) for n in chunk], {"format": "pt"})
        with open(path / filename, "wb") as fh:
            fh.write(head)
            for n in chunk:
                fh.write(np.ascontiguousarray(tensors[n]).tobytes())
                weight_map[n] = filename
                total += tensors[n].nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m awqpad.example",
        description="Write a tiny random Qwen2-shaped AWQ-GEMM checkpoint (2 layers, intermediate_size 2432 = "
                    "19 groups of 128, ~5 MB) that vLLM refuses at TP 2 and 4 until awqpad pads it.",
        epilog="Exit codes: 0 written (or an example is already there), 2 bad usage, 4 OUT exists and is "
               "something else (use --force).")
    p.add_argument("out", metavar="OUT", type=Path, help="directory to create")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (the old OUT is removed only once the new one is complete)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: %(default)s)")
    return p


def _is_example(path: Path) -> bool:
    """Whether `path` holds a checkpoint this module wrote (its config and README say so)."""
    try:
        readme = (path / "README.md").read_text(errors="replace")
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "made by `python -m awqpad.example`" in readme and config.get("intermediate_size") == INTERMEDIATE


def _fail(message: str, code: int) -> int:
    print(f"awqpad.example: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        return _fail(f"{out} exists and is not a directory", 4)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        if _is_example(out):  # re-running a set-up line is not an error
            print(f"{out}: an example checkpoint is already there; leaving it alone (--force rewrites it)",
                  file=sys.stderr)
            return 0
        return _fail(f"{out} exists and is not empty; use --force to replace it", 4)
    # Written beside OUT, then renamed into place: an interrupted run leaves no half-written OUT, and
    # --force loses the old OUT only after the new one is complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        make_example(tmp, seed=args.seed)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc.strerror or exc}", 4)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing written", 130)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
