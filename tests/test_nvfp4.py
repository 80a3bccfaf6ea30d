"""NVFP4 (compressed-tensors nvfp4-pack-quantized and ModelOpt): inspect, plan, pad, verify.

Fixtures come from tests/factory_fp4.py (numpy, independent of awqpad); padded checkpoints are judged
by the factory's own e2m1/e4m3 decoder in float64 (and by compressed-tensors in test_oracles_fp4.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from awqpad.checkpoint.model import read_checkpoint
from awqpad.source import resolve_source
from tests.factory_fp4 import E4M3, Fp4Model, build_nvfp4, dequant_nvfp4, load_raw, unpack_nibbles

DENSE = Fp4Model()  # intermediate 464 = 29 groups of 16
MOE = Fp4Model(arch="qwen3_moe", experts=4, moe_intermediate=464, intermediate=928)
SHARED = Fp4Model(arch="qwen2_moe", experts=2, moe_intermediate=464, shared_intermediate=928 + 16)
FUSED = Fp4Model(arch="phi3")


def awqpad(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"awqpad {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ckpt(path):
    return read_checkpoint(resolve_source(str(path)))


def _module(tensors: dict, prefix: str, flavour: str):
    main = tensors[f"{prefix}.weight_packed" if flavour == "ct" else f"{prefix}.weight"]
    scale = tensors[f"{prefix}.weight_scale"]
    g = tensors[f"{prefix}.weight_global_scale" if flavour == "ct" else f"{prefix}.weight_scale_2"]
    return main, scale, float(np.asarray(g).reshape(-1)[0])


def decode(tensors: dict, prefix: str, flavour: str) -> np.ndarray:
    main, scale, g = _module(tensors, prefix, flavour)
    return dequant_nvfp4(main, scale, g, flavour)


@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
def test_inspect_reads_both_flavours(tmp_path, flavour):
    build_nvfp4(tmp_path / "m", MOE, flavour)
    c = ckpt(tmp_path / "m")
    assert c.format == "nvfp4"
    assert c.dims.widths == {"expert": (464,)}
    experts = [lin for lin in c.linears if lin.block == "expert"]
    assert experts and all(lin.format == "nvfp4" and lin.group_size == 16 and lin.bits == 4 for lin in experts)
    down = next(lin for lin in experts if lin.role == "down")
    assert (down.in_features, down.out_features, down.groups) == (464, MOE.hidden, 29)
    assert [lin.format for lin in c.linears if lin.block == "router"] == ["dense"] * MOE.layers
    report = json.loads(awqpad("inspect", tmp_path / "m", "--json").stdout)
    assert report["format"] == "nvfp4" and report["quantization"]["group_size"] == 16


def test_modelopt_side_file_alone_is_enough(tmp_path):
    build_nvfp4(tmp_path / "m", DENSE, "modelopt", modelopt_in_config=False)
    c = ckpt(tmp_path / "m")
    assert c.quant.method == "modelopt" and c.quant.checkpoint_format == "nvfp4"
    assert c.format == "nvfp4" and all(lin.format == "nvfp4" for lin in c.linears)


def test_nibble_order_is_low_first(tmp_path):
    """Value 2i is the low nibble of byte i (compressed-tensors pack_fp4_to_uint8), so appended inputs
    of down_proj are whole trailing bytes and the source's bytes stay where they were."""
    fx = build_nvfp4(tmp_path / "m", DENSE, "ct", shards=1)
    t = load_raw(tmp_path / "m")
    p = "model.layers.0.mlp.down_proj"
    assert np.array_equal(unpack_nibbles(t[f"{p}.weight_packed"]), fx.quantized[p]["codes"])
    from awqpad.checkpoint.formats import nvfp4

    c = ckpt(tmp_path / "m")
    lin = next(lin for lin in c.linears if lin.prefix == p)
    arrays = {"weight_packed": t[f"{p}.weight_packed"], "weight_scale": t[f"{p}.weight_scale"],
              "weight_global_scale": t[f"{p}.weight_global_scale"]}
    assert np.array_equal(nvfp4.dequantize(arrays, lin), fx.weights[p])
    assert np.array_equal(nvfp4.dequantize(arrays, lin, "nvfp4-marlin"), fx.weights[p])  # all scales >= 0


def test_zero_scale_byte_is_zero_under_every_reader():
    from awqpad.checkpoint.formats import nvfp4
    from awqpad.checkpoint.formats.base import fill_bytes

    assert fill_bytes("F8_E4M3", 0.0) == b"\x00" and E4M3[0] == 0.0
    assert nvfp4.marlin_scales(np.array([0x00], np.uint8))[0] == 0.0
    # 0x80 would be -0.0 here and NaN in e4m3fnuz: never written
    assert fill_bytes("F8_E4M3", -0.0) == b"\x00"
    with pytest.raises(Exception):
        fill_bytes("F8_E4M3", 0.3)


def test_bad_scale_shape_is_one_line(tmp_path):
    build_nvfp4(tmp_path / "m", DENSE, "modelopt", shards=1)
    path = tmp_path / "m" / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "model.layers.0.mlp.down_proj.weight_scale"
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows * cols // 2, 2]  # same bytes, wrong shape
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    proc = awqpad("inspect", tmp_path / "m", check=False)
    assert proc.returncode == 2
    assert "weight_scale shape" in proc.stderr and "Traceback" not in proc.stderr
