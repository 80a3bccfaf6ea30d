"""Tier 1, part 1: awqpad's padded tensors decoded by the format owners' own dequantizers.

Our packer and dequantizer cannot judge our own padding, so here every padded module is decoded by
third-party code:

* AWQ-GEMM: AutoAWQ 0.2.9 ``awq/utils/packing_utils.py::dequantize_gemm`` (loaded by file path: the
  ``awq`` package itself imports transformers-4-era code) and GPTQModel's own copy of it
  (``gptqmodel.quantization.awq.utils.packing_utils``), the one its CPU AWQ kernel runs.
* GPTQ (v1 and v2, sym/asym, act-order, 4- and 8-bit): GPTQModel 7.7.0 ``TorchLinear.dequantize_weight``
  (the pure-torch kernel's path), after GPTQModel's own v1 -> v2 zero-point conversion for v1 checkpoints.
* GPTQ v1 additionally: AutoGPTQ 0.7.1's two CPU/torch readers, ``qlinear_cuda.py`` (honours g_idx, adds 1
  to the stored zero without masking) and ``qlinear_cuda_old.py`` (positional groups, masks after +1),
  loaded by path from the sources .ci/oracles.sh extracts from the PyPI wheel (installing that wheel is
  not an option: it ships a top-level ``tests`` package that would shadow this repo's tests/). They are
  driven through their own ``forward`` on an identity matrix, which returns W^T exactly.
* compressed-tensors pack-quantized (sym/asym): ``PackedQuantizationCompressor.decompress`` 0.20 with the
  scheme parsed from the checkpoint's own config.json by ``QuantizationConfig``.

Not covered, on purpose: per-channel (group_size -1) checkpoints, which awqpad refuses to pad for vLLM at
TP 4 (exit 3); compressed-tensors ``actorder: group`` (``weight_g_idx``), which compressed-tensors 0.20's
``QuantizationConfig`` rejects outright and whose ``decompress`` ignores g_idx.

For every padded module: the decoded padded weight is exactly 0 at the positions awqpad.json says were
inserted, and bit-identical to the decoded unpadded weight everywhere else; modules awqpad did not touch
decode bit-identically. The fixtures come from tests/factory.py (independent of awqpad).

Missing oracle packages skip these tests locally (``bash .ci/oracles.sh`` installs them) and fail them
when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

try:
    from tests import oracle_env
    from tests.factory import Model, Quant, build_checkpoint
except ImportError:  # pragma: no cover - run from inside tests/
    import oracle_env
    from factory import Model, Quant, build_checkpoint

torch = oracle_env.import_torch(module_level=True)

pytestmark = pytest.mark.oracle

# TP 4 is legal for attention (8 heads, 4 KV heads); intermediate 2432 = 19 groups of 128 -> 2560.
MODEL = Model(arch="qwen2", hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=2432, layers=2, vocab=320)
TP = (2, 4)


# ------------------------------------------------------------------------------------------------
# oracle availability: skip locally, fail in CI
# ------------------------------------------------------------------------------------------------

missing = oracle_env.missing  # test_runtime.py uses it too


@lru_cache(maxsize=None)
def _load(name: str):
    """-> (module or None, error text)."""
    try:
        if name == "autoawq":
            spec = importlib.util.find_spec("awq")  # finds the package without importing it
            if spec is None or not spec.submodule_search_locations:
                return None, "package 'autoawq' (module awq) not installed"
            path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "packing_utils.py"
            from importlib.metadata import version
            if version("autoawq") != "0.2.9":
                return None, f"autoawq {version('autoawq')} installed, tests pin 0.2.9"
            s = importlib.util.spec_from_file_location("_autoawq_packing_utils", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return mod, ""
        if name == "gptqmodel_awq":
            os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
            return importlib.import_module("gptqmodel.quantization.awq.utils.packing_utils"), ""
        if name == "gptqmodel_gptq":
            os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear
            from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
            return (TorchLinear, convert_gptq_v1_to_v2_format_module), ""
        if name in ("autogptq_cuda", "autogptq_cuda_old"):
            d = Path(os.environ.get("AWQPAD_AUTOGPTQ_DIR",
                                    Path(__file__).resolve().parent.parent / ".cache" / "oracles" / "auto_gptq-0.7.1"))
            path = d / ("qlinear_" + name.split("_", 1)[1] + ".py")  # qlinear_cuda.py, qlinear_cuda_old.py
            if not path.exists():
                return None, f"{path} missing (AutoGPTQ 0.7.1 sources are extracted by .ci/oracles.sh)"
            s = importlib.util.spec_from_file_location(f"_autogptq_{path.stem}", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return mod, ""
        if name == "compressed_tensors":
            from compressed_tensors.compressors import PackedQuantizationCompressor
            from compressed_tensors.quantization import QuantizationConfig
            return (PackedQuantizationCompressor, QuantizationConfig), ""
    except Exception as e:  # ImportError, or a broken install
        return None, f"{type(e).__name__}: {e}"
    raise KeyError(name)


def oracle(name: str):
    mod, err = _load(name)
    if mod is None:
        missing(name, err)
    return mod


# ------------------------------------------------------------------------------------------------
# third-party decoders: module tensors (torch, full names stripped) -> W [out, in] as float64
# ------------------------------------------------------------------------------------------------

def _awq_group(cfg: dict, t: dict) -> int:
    g = cfg["quantization_config"]["group_size"]
    return t["qweight"].shape[0] if g == -1 else g


def decode_autoawq(t: dict, cfg: dict) -> torch.Tensor:
    pu = oracle("autoawq")
    w = pu.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, _awq_group(cfg, t))  # [K, N]
    return w.double().t()


def decode_gptqmodel_awq(t: dict, cfg: dict) -> torch.Tensor:
    pu = oracle("gptqmodel_awq")
    w = pu.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, _awq_group(cfg, t))
    return w.double().t()


def decode_gptqmodel_gptq(t: dict, cfg: dict) -> torch.Tensor:
    TorchLinear, v1_to_v2 = oracle("gptqmodel_gptq")
    qc = cfg["quantization_config"]
    bits, g = qc["bits"], qc["group_size"]
    k = t["g_idx"].shape[0]
    n = t["scales"].shape[1]
    m = TorchLinear(bits=bits, group_size=g, sym=qc["sym"], desc_act=qc["desc_act"], in_features=k,
                    out_features=n, bias=False, pack_dtype=torch.int32, register_buffers=True)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        want = t[name].to(torch.int32) if name == "g_idx" else t[name]
        assert tuple(getattr(m, name).shape) == tuple(want.shape), (name, getattr(m, name).shape, want.shape)
        setattr(m, name, want.clone())
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt == "gptq":  # v1 on disk: GPTQModel converts to its internal v2 zero points on load
        v1_to_v2(m, bits, torch.int32)
    with torch.no_grad():
        w = m.dequantize_weight()  # [K, N]
    return w.double().t()


def _decode_autogptq(name: str, t: dict, cfg: dict) -> torch.Tensor:
    ql = oracle(name)
    qc = cfg["quantization_config"]
    bits, g = qc["bits"], qc["group_size"]
    k, n = t["g_idx"].shape[0], t["scales"].shape[1]
    m = ql.QuantLinear(bits, g, k, n, False, weight_dtype=torch.float32)
    m.qweight = t["qweight"].clone()
    m.qzeros = t["qzeros"].clone()
    m.scales = t["scales"].float()  # exact widening; their formula is unchanged
    m.g_idx = t["g_idx"].to(torch.int32).clone()
    with torch.no_grad():
        w = m(torch.eye(k, dtype=torch.float32))  # their torch path: x @ W^T -> W^T [K, N]
    return w.double().t()


def decode_autogptq_cuda(t: dict, cfg: dict) -> torch.Tensor:
    return _decode_autogptq("autogptq_cuda", t, cfg)


def decode_autogptq_cuda_old(t: dict, cfg: dict) -> torch.Tensor:
    return _decode_autogptq("autogptq_cuda_old", t, cfg)


def decode_compressed_tensors(t: dict, cfg: dict) -> torch.Tensor:
    Compressor, QuantizationConfig = oracle("compressed_tensors")
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    (scheme,) = qc.config_groups.values()
    sd = {k: t[k] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape") if k in t}
    out = Compressor.decompress(sd, scheme)
    return out["weight"].double()  # [N, K]


ORACLES = {
    "awq": [("AutoAWQ dequantize_gemm", decode_autoawq), ("GPTQModel awq dequantize_gemm", decode_gptqmodel_awq)],
    "gptq": [("GPTQModel TorchLinear.dequantize_weight", decode_gptqmodel_gptq)],
    "ct": [("compressed-tensors PackedQuantizationCompressor.decompress", decode_compressed_tensors)],
}

ORACLE_PACKAGES = {"awq": ["autoawq", "gptqmodel_awq"], "gptq": ["gptqmodel_gptq"], "ct": ["compressed_tensors"]}
AUTOGPTQ = [("AutoGPTQ qlinear_cuda (torch path)", decode_autogptq_cuda, "autogptq_cuda"),
            ("AutoGPTQ qlinear_cuda_old (torch path)", decode_autogptq_cuda_old, "autogptq_cuda_old")]


def decoders_for(cfg: dict) -> list:
    """The decoders that apply to this checkpoint: AutoGPTQ only reads GPTQ v1 (it predates v2), and
    qlinear_cuda_old ignores g_idx, so it only reads checkpoints without act-order."""
    qc = cfg["quantization_config"]
    method = {"compressed-tensors": "ct"}.get(qc["quant_method"], qc["quant_method"])
    out = list(ORACLES[method])
    if method == "gptq" and str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower() == "gptq":
        for oname, fn, pkg in AUTOGPTQ:
            if pkg == "autogptq_cuda_old" and qc.get("desc_act"):
                continue
            out.append((oname, fn))
    return out


def require_oracles(method: str) -> None:
    for name in ORACLE_PACKAGES[method] + ([p for _, _, p in AUTOGPTQ] if method == "gptq" else []):
        oracle(name)


# which stored tensor/axis carries the logical out (N) and in (K) positions, and the multiplier from
# that axis' index to logical positions
AXES = {
    "awq": {"N": ("scales", 1, lambda b: 1), "K": ("qweight", 0, lambda b: 1)},
    "gptq": {"N": ("scales", 1, lambda b: 1), "K": ("g_idx", 0, lambda b: 1)},
    "ct": {"N": ("weight_scale", 0, lambda b: 1), "K": ("weight_packed", 1, lambda b: 32 // b)},
}

CASES = {
    "awq-zero_point": Quant("awq", sym=False),
    "awq-no_zero_point": Quant("awq", sym=True),
    "gptq-v1-sym": Quant("gptq", sym=True),
    "gptq-v1-asym": Quant("gptq", sym=False),
    "gptq-v2-sym": Quant("gptq", sym=True, checkpoint_format="gptq_v2"),
    "gptq-v2-asym": Quant("gptq", sym=False, checkpoint_format="gptq_v2"),
    "gptq-v1-act_order": Quant("gptq", sym=True, desc_act=True),
    "gptq-v2-asym-act_order": Quant("gptq", sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    "gptq-v1-8bit": Quant("gptq", bits=8, sym=True),
    "gptq-v2-8bit-asym": Quant("gptq", bits=8, sym=False, checkpoint_format="gptq_v2"),
    "ct-sym": Quant("ct", sym=True),
    "ct-asym": Quant("ct", sym=False),
    "ct-asym-bf16": Quant("ct", sym=False, scale_dtype="BF16"),
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def run_awqpad_pad(src: Path, out: Path, tp=TP) -> dict:
    cmd = [sys.executable, "-m", "awqpad", "pad", str(src), str(out), "-q"]
    for t in tp:
        cmd += ["--tp", str(t)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"awqpad pad failed ({r.returncode}): {r.stdout}{r.stderr}"
    return json.loads((out / "awqpad.json").read_text())


def load_torch(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def module_tensors(all_t: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in all_t.items()
            if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}


def inserted_positions(ops: dict[str, dict], prefix: str, method: str, bits: int, which: str, new_len: int) -> list[int]:
    """Logical indices (in the padded module) that awqpad.json says were inserted along N or K."""
    tensor, axis, mult = AXES[method][which]
    op = ops.get(f"{prefix}.{tensor}")
    if op is None or op["axis"] != axis:
        return []
    m = mult(bits)
    pos, shift = [], 0
    for ins in sorted(op["inserts"], key=lambda i: i["at"]):
        start = ins["at"] * m + shift
        pos += range(start, start + ins["count"] * m)
        shift += ins["count"] * m
    assert all(0 <= p < new_len for p in pos), (prefix, which, pos[:3], new_len)
    return pos


def keep_mask(n: int, pos: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[pos] = False
    return keep


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


@pytest.fixture(scope="module")
def padded_cases(tmp_path_factory):
    """Build every case's checkpoint and pad it once per module (a few seconds in all)."""
    root = tmp_path_factory.mktemp("oracles")
    built = {}

    def get(case: str):
        if case not in built:
            q = CASES[case]
            src, out = root / case, root / f"{case}-padded"
            fx = build_checkpoint(src, MODEL, q, shards=2, seed=11)
            report = run_awqpad_pad(src, out)
            built[case] = (fx, src, out, report)
        return built[case]

    return get


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_third_party_decoders_see_exact_zero_padding(case, padded_cases):
    require_oracles(CASES[case].method)  # skip (locally) or fail (CI) before doing any work
    fx, src, out, report = padded_cases(case)
    q = fx.quant
    cfg_o = json.loads((src / "config.json").read_text())
    cfg_p = json.loads((out / "config.json").read_text())
    decoders = decoders_for(cfg_o)
    assert cfg_o["intermediate_size"] == 2432 and cfg_p["intermediate_size"] == 2560, cfg_p["intermediate_size"]
    t_o, t_p = load_torch(src), load_torch(out)
    ops = {op["tensor"]: op for op in report["ops"]}
    touched = {name.rsplit(".", 1)[0] for name in ops}
    assert touched, "awqpad reported no ops although 2432 is not whole groups per rank at TP 2/4"

    checked_padded = 0
    for prefix in fx.quantized:
        mo, mp = module_tensors(t_o, prefix), module_tensors(t_p, prefix)
        for oname, decode in decoders:
            w_o, w_p = decode(mo, cfg_o), decode(mp, cfg_p)
            where = f"{case} {prefix} [{oname}]"
            if prefix not in touched:
                assert bit_equal(w_o, w_p), f"{where}: untouched module decodes differently after padding"
                continue
            n_pos = inserted_positions(ops, prefix, q.method, q.bits, "N", w_p.shape[0])
            k_pos = inserted_positions(ops, prefix, q.method, q.bits, "K", w_p.shape[1])
            assert w_p.shape[0] - w_o.shape[0] == len(n_pos), f"{where}: {w_o.shape}->{w_p.shape}, N inserts {len(n_pos)}"
            assert w_p.shape[1] - w_o.shape[1] == len(k_pos), f"{where}: {w_o.shape}->{w_p.shape}, K inserts {len(k_pos)}"
            assert n_pos or k_pos, f"{where}: touched but no logical padding found"
            if n_pos:
                pad = w_p[n_pos, :]
                assert torch.count_nonzero(pad) == 0, \
                    f"{where}: padded output rows not exactly 0 (max |w| {pad.abs().max().item()})"
            if k_pos:
                pad = w_p[:, k_pos]
                assert torch.count_nonzero(pad) == 0, \
                    f"{where}: padded input columns not exactly 0 (max |w| {pad.abs().max().item()})"
            kept = w_p[keep_mask(w_p.shape[0], n_pos)][:, keep_mask(w_p.shape[1], k_pos)]
            assert bit_equal(kept, w_o), \
                f"{where}: original region changed (max |diff| {(kept - w_o).abs().max().item()})"
            checked_padded += 1
    # gate, up and down of both layers, by every decoder of the format
    assert checked_padded == 3 * MODEL.layers * len(decoders), checked_padded


@pytest.mark.parametrize("case", ["awq-zero_point", "gptq-v1-asym", "gptq-v1-act_order", "gptq-v2-asym-act_order",
                                  "gptq-v1-8bit", "ct-asym"])
def test_third_party_decoders_agree_with_factory(case, padded_cases):
    """Sanity of the harness itself (not of awqpad): the owners' decoders read the unpadded fixtures to the
    weights tests/factory.py meant to store. If this fails, fix the factory or the oracle call, not awqpad."""
    require_oracles(CASES[case].method)
    fx, src, _, _ = padded_cases(case)
    cfg = json.loads((src / "config.json").read_text())
    t = load_torch(src)
    for oname, decode in decoders_for(cfg):
        for prefix in fx.quantized:
            w = decode(module_tensors(t, prefix), cfg).numpy()
            ref = fx.weights[prefix]
            # fp16/bf16 arithmetic inside the decoders: compare to the float64 reference with a scale tolerance
            tol = 2e-2 if fx.quant.scale_dtype == "BF16" else 2e-3
            err = np.abs(w - ref).max() / max(np.abs(ref).max(), 1e-30)
            assert err <= tol, f"{case} {prefix} [{oname}] vs factory: rel max err {err:.2e}"
