#!/usr/bin/env python
"""Make a tiny checkpoint with a REAL quantizer (GPTQModel's GPTQ or AWQ), cached by versions.

    python scripts/real_quant_fixture.py gptq                 # prints the fixture's directory
    python scripts/real_quant_fixture.py awq --cache-root DIR
    python scripts/real_quant_fixture.py gptq --out DIR       # no cache, write exactly there

The base model is tests/factory.py's random fp16 Qwen2 (hidden 512, 8 heads x 64, 4 KV heads,
intermediate 2432 = 19 groups of 128, 2 layers, vocab 320), so the quantized checkpoint is not whole
groups per rank at TP 2 or 4. GPTQModel 7.7.0 quantizes it on the CPU with random token-id
calibration (the factory's tokenizer is a stub): GPTQ ~20-30 s, AWQ ~60-90 s on 2 cores.

The result is cached under --cache-root (default .cache/awqpad-tests, git-ignored) in a directory
named by a hash of the package versions, this script and tests/factory.py; it is written to a
temporary sibling and renamed, so a half-written fixture is never reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_KW = dict(arch="qwen2", hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=2432, layers=2, vocab=320)
RECIPES = {
    # samples x seq_len random token ids; GPTQ: sym v1 (what GPTQModel exports by default);
    # AWQ: GEMM with zero points
    "gptq": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "samples": 16, "seq": 64, "seed": 5},
    "awq": {"bits": 4, "group_size": 128, "sym": False, "samples": 4, "seq": 64, "seed": 5},
}
PACKAGES = ("gptqmodel", "torch", "transformers", "safetensors", "accelerate")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def cache_key(method: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"method": method, "recipe": RECIPES[method], "model": MODEL_KW,
                         "versions": _versions()}, sort_keys=True).encode())
    for f in (Path(__file__).resolve(), ROOT / "tests" / "factory.py"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def quantize(method: str, out: Path) -> Path:
    """Build the fp16 base with the factory and quantize it with GPTQModel into `out` (must not exist)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's CPU pool fails on 2 cores otherwise
    import torch
    from tests.factory import Model, Quant, build_checkpoint

    r = RECIPES[method]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="awqpad-real-quant-") as tmp:
        base = Path(tmp) / "base-fp16"
        build_checkpoint(base, Model(**MODEL_KW), Quant("fp16"), shards=1, seed=r["seed"])
        from gptqmodel import GPTQModel, QuantizeConfig
        if method == "gptq":
            qcfg = QuantizeConfig(bits=r["bits"], group_size=r["group_size"], sym=r["sym"], desc_act=r["desc_act"],
                                  offload_to_disk=False)
        else:
            from gptqmodel.quantization.config import AWQConfig
            qcfg = AWQConfig(bits=r["bits"], group_size=r["group_size"], sym=r["sym"], offload_to_disk=False,
                             scale_search_chunked_activations=False, gc_mode="on_stage_end")
        g = torch.Generator().manual_seed(r["seed"])
        vocab = MODEL_KW["vocab"]
        calib = [{"input_ids": torch.randint(3, vocab - 3, (1, r["seq"]), generator=g),
                  "attention_mask": torch.ones(1, r["seq"], dtype=torch.long)} for _ in range(r["samples"])]
        model = GPTQModel.load(str(base), qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calib, batch_size=4)
        model.save(str(out))
    meta = {"quantizer": f"gptqmodel {_versions()['gptqmodel']}", "method": method, "recipe": RECIPES[method],
            "model": MODEL_KW, "versions": _versions(), "seconds": round(time.time() - t0, 1)}
    (out / "awqpad-test-fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def cached(method: str, cache_root: Path) -> Path:
    final = cache_root / f"gptqmodel-{method}-{cache_key(method)}"
    if (final / "awqpad-test-fixture.json").exists():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
    try:
        quantize(method, work / "q")
        if final.exists():  # a concurrent run finished first
            return final
        os.replace(work / "q", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(RECIPES))
    p.add_argument("--cache-root", type=Path, default=ROOT / ".cache" / "awqpad-tests")
    p.add_argument("--out", type=Path, help="write here (must not exist); no caching")
    a = p.parse_args(argv)
    if a.out is not None:
        if a.out.exists():
            p.error(f"{a.out} exists")
        path = quantize(a.method, a.out)
    else:
        path = cached(a.method, a.cache_root)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
