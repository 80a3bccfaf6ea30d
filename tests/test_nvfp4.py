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
MOE = Fp4Model(arch="qwen3_moe", experts=4, moe_intermediate=464, intermediate=928, heads=8, kv_heads=2, head_dim=16)
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


def _pad(tmp_path, model, flavour, tp, *extra):
    fx = build_nvfp4(tmp_path / "src", model, flavour)
    awqpad("pad", tmp_path / "src", tmp_path / "out", "--tp", tp, *extra)
    return fx, load_raw(tmp_path / "out"), json.loads((tmp_path / "out" / "config.json").read_text())


def _check_mlp(out: dict, fx, prefix_gate, prefix_up, prefix_down, width: int, new: int, flavour: str):
    """Gate/up rows and down columns beyond `width` decode to exactly 0; the rest to the source weights."""
    for p in (prefix_gate, prefix_up):
        w = decode(out, p, flavour)
        assert w.shape[0] == new
        assert np.array_equal(w[:width], fx.weights[p]), p
        assert not w[width:].any(), p
        main, scale, _ = _module(out, p, flavour)
        assert not main[width:].any() and not scale[width:].any()  # code 0x00 and scale byte 0x00
    w = decode(out, prefix_down, flavour)
    assert w.shape[1] == new
    assert np.array_equal(w[:, :width], fx.weights[prefix_down])
    assert not w[:, width:].any()
    main, scale, _ = _module(out, prefix_down, flavour)
    assert not main[:, width // 2 :].any()
    # groups that hold only padding carry scale byte 0x00 (+0.0); a partial last group keeps its scale
    assert not scale[:, -(-width // 16) :].any()
    assert np.array_equal(scale[:, : -(-width // 16)], fx.quantized[prefix_down]["scale"])


@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
def test_pad_dense_exact(tmp_path, flavour):
    fx, out, cfg = _pad(tmp_path, DENSE, flavour, 4)
    new = cfg["intermediate_size"]
    assert new > 464 and new % (4 * 16) == 0
    for L in range(DENSE.layers):
        p = f"model.layers.{L}.mlp"
        _check_mlp(out, fx, f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj", 464, new, flavour)
    src = load_raw(tmp_path / "src")
    for name, value in src.items():  # global / input scales, attention, norms: untouched
        if "mlp" not in name or name.endswith(("global_scale", "scale_2", "input_scale")):
            assert out[name].tobytes() == value.tobytes() and out[name].shape == value.shape, name


@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
def test_pad_moe_experts_exact(tmp_path, flavour):
    fx, out, cfg = _pad(tmp_path, MOE, flavour, 8)
    new = cfg["moe_intermediate_size"]
    assert new > 464 and new % (8 * 16) == 0
    for L in range(MOE.layers):
        for e in range(MOE.experts):
            p = f"model.layers.{L}.mlp.experts.{e}"
            _check_mlp(out, fx, f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj", 464, new, flavour)


def test_pad_shared_expert_modelopt(tmp_path):
    fx, out, cfg = _pad(tmp_path, SHARED, "modelopt", 4)
    assert cfg["shared_expert_intermediate_size"] > SHARED.shared_intermediate
    new = cfg["shared_expert_intermediate_size"]
    p = "model.layers.1.mlp.shared_expert"
    _check_mlp(out, fx, f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj", SHARED.shared_intermediate, new, "modelopt")


def test_pad_fused_gate_up_pads_each_half(tmp_path):
    fx, out, cfg = _pad(tmp_path, FUSED, "ct", 4)
    new, width = cfg["intermediate_size"], FUSED.intermediate
    p = "model.layers.0.mlp"
    w = decode(out, f"{p}.gate_up_proj", "ct")
    src = fx.weights[f"{p}.gate_up_proj"]
    assert w.shape[0] == 2 * new
    assert np.array_equal(w[:width], src[:width]) and not w[width:new].any()  # gate half, then its padding
    assert np.array_equal(w[new : new + width], src[width:]) and not w[new + width :].any()  # up half
    d = decode(out, f"{p}.down_proj", "ct")
    assert np.array_equal(d[:, :width], fx.weights[f"{p}.down_proj"]) and not d[:, width:].any()




@pytest.mark.parametrize("flavour,model,tp", [("ct", DENSE, 4), ("modelopt", MOE, 8), ("ct", FUSED, 2)])
def test_verify_passes_and_reads_every_reader(tmp_path, flavour, model, tp):
    build_nvfp4(tmp_path / "src", model, flavour)
    awqpad("pad", tmp_path / "src", tmp_path / "out", "--tp", tp)
    report = json.loads(awqpad("verify", tmp_path / "src", tmp_path / "out", "--json").stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"] and all(c["ok"] for c in report["checks"])
    assert set(checks["zeros"]["figures"]["readers"]) == {"nvfp4", "nvfp4-marlin"}
    assert checks["zeros"]["figures"]["weights"] > 0
    assert checks[f"function TP={tp}"]["figures"]["max_rel_error"] <= 1e-12


def _poke(path: Path, tensor: str, index: tuple, byte: int) -> None:
    """Overwrite one byte of a U8/F8 tensor in place (a corrupted padded checkpoint)."""
    for f in sorted(path.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        if tensor in header:
            shape = header[tensor]["shape"]
            flat = int(np.ravel_multi_index(index, shape))
            raw[8 + n + header[tensor]["data_offsets"][0] + flat] = byte
            f.write_bytes(bytes(raw))
            return
    raise KeyError(tensor)


@pytest.mark.parametrize("what,byte", [("scale", 0x7F), ("scale", 0x38), ("code", 0x01)])
def test_verify_catches_a_bad_padding_byte(tmp_path, what, byte):
    """Negative controls: a NaN (0x7F) or 1.0 (0x38) scale, or a non-zero code, in the padding must fail."""
    build_nvfp4(tmp_path / "src", DENSE, "ct")
    awqpad("pad", tmp_path / "src", tmp_path / "out", "--tp", 4)
    p = "model.layers.1.mlp.down_proj"
    tensor = f"{p}.weight_scale" if what == "scale" else f"{p}.weight_packed"
    col = 464 // 16 + 1 if what == "scale" else 464 // 2 + 3
    _poke(tmp_path / "out", tensor, (5, col), byte)
    proc = awqpad("verify", tmp_path / "src", tmp_path / "out", "--json", check=False)
    assert proc.returncode == 1
    failed = {c["name"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]}
    assert "pad-fill" in failed


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


NEMOTRON_NANO = Fp4Model(arch="qwen3_moe", hidden=2688, intermediate=1856, layers=1, heads=32, kv_heads=2, head_dim=128,
                         experts=2, moe_intermediate=1856, vocab=1024)


@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
def test_header_only_plan_nemotron_nano_expert_1856_at_tp8(tmp_path, flavour):
    """vllm#49949: 1856 / 8 = 232 per rank = 14.5 groups of 16. Whole groups per rank: 8 x 15 x 16 = 1920
    (+3.4 %); no engine asks more (FP4 kernel tiles are padded by the engines themselves)."""
    build_nvfp4(tmp_path / "m", NEMOTRON_NANO, flavour, data=False)
    for engine in ("vllm", "vllm-latest", "sglang"):
        plan = json.loads(awqpad("plan", tmp_path / "m", "--tp", 8, "--engine", engine, "--json").stdout)
        dim = plan["dims"]["moe_intermediate_size"]
        assert (dim["original"], dim["padded"], dim["rules"]) == (1856, 1920, ["expert-nvfp4-groups"]), engine
        assert round(dim["added_percent"], 1) == 3.4
        before = [v for v in plan["violations_before"] if v["rule"] == "expert-nvfp4-groups"]
        assert before and before[0]["value"] == 232
    trt = json.loads(awqpad("plan", tmp_path / "m", "--tp", 8, "--engine", "trtllm", "--json").stdout)
    assert trt["dims"]["moe_intermediate_size"]["padded"] == 1856  # TensorRT-LLM#18870 keeps whole groups itself
    for tp, padded in ((1, 1856), (2, 1856), (4, 1856), (16, 2048)):
        plan = json.loads(awqpad("plan", tmp_path / "m", "--tp", tp, "--json").stdout)
        assert plan["dims"]["moe_intermediate_size"]["padded"] == padded, tp


def test_dense_nvfp4_rule_text_is_the_engines(tmp_path):
    build_nvfp4(tmp_path / "m", DENSE, "modelopt", data=False)
    plan = json.loads(awqpad("plan", tmp_path / "m", "--tp", 2, "--json").stdout)
    assert plan["dims"]["intermediate_size"]["padded"] == 480  # 2 x 15 x 16
    msgs = {v["message"] for v in plan["violations_before"]}
    assert "Unsupported model when in features size is not multiple of 16" in msgs


@pytest.mark.parametrize("engine", ["tgi", "lmdeploy"])
@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
def test_engines_without_an_nvfp4_loader_refuse_at_every_tp(tmp_path, engine, flavour):
    """TGI and LMDeploy have no NVFP4 loader (read in their code): even a TP that splits every group whole is
    refused, so pad never writes an OUT that promises them a load."""
    build_nvfp4(tmp_path / "m", Fp4Model(intermediate=512), flavour, data=False)
    for tp in (1, 2):
        proc = awqpad("plan", tmp_path / "m", "--tp", tp, "--engine", engine, "--json", check=False)
        assert proc.returncode == 3, proc.stderr
        plan = json.loads(proc.stdout)
        assert [b["rule"] for b in plan["blockers"]] == ["nvfp4-no-loader"], plan["blockers"]
        assert plan["blockers"][0]["nearest_tp"] == []
    proc = awqpad("pad", tmp_path / "m", tmp_path / "out", "--tp", 2, "--engine", engine, check=False)
    assert proc.returncode == 3 and "has no loader for nvfp4" in proc.stderr and not (tmp_path / "out").exists()
    vllm = json.loads(awqpad("plan", tmp_path / "m", "--tp", 2, "--json").stdout)  # vLLM still loads it
    assert not vllm["blockers"]
