"""A check that compared nothing must not pass: verify on a SRC whose values are all NaN/inf."""

from __future__ import annotations

import numpy as np

from tests.factory import Model, Quant, build_checkpoint, load_tensors, shard_files, write_safetensors
from tests.factory import _header  # the stored dtype of each tensor
from tests.test_verify import SMALL, TP, checks, failed, pad, verify_json


def _poison_scales(src, value: float, every: bool) -> None:
    """Set the fp16 scales of every MLP module (all modules if `every`) to `value`, in place."""
    for f in shard_files(src):
        header, _ = _header(f)
        tensors = load_tensors(f)
        for name, a in tensors.items():
            if name.endswith(".scales") and (every or ".mlp." in name):
                tensors[name] = np.full_like(a, value)
        write_safetensors(f, [(n, header[n]["dtype"], a) for n, a in tensors.items()], {"format": "pt"})


def test_all_nan_src_fails_the_function_check_and_says_why(tmp_path):
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    _poison_scales(src, np.nan, every=True)
    out = pad(src, tmp_path / "out")
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1, report
    why = failed(report)[f"function TP={TP}"]
    assert why.startswith("not compared: all ") and "NaN/inf in SRC itself" in why, why
    assert checks(report)[f"function TP={TP}"]["figures"]["nonfinite_outputs"] > 0


def test_some_finite_outputs_still_compare(tmp_path):
    """inf in one layer's MLP only: the finite blocks are compared, so the check can pass."""
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    for f in shard_files(src):
        header, _ = _header(f)
        tensors = load_tensors(f)
        for name in tensors:
            if name.startswith("model.layers.0.mlp.") and name.endswith(".scales"):
                tensors[name] = np.full_like(tensors[name], np.inf)
        write_safetensors(f, [(n, header[n]["dtype"], a) for n, a in tensors.items()], {"format": "pt"})
    out = pad(src, tmp_path / "out")
    code, report, _ = verify_json(src, out, "--tp", TP)
    function = checks(report)[f"function TP={TP}"]
    assert function["ok"], function
    assert code == 0, failed(report)
