"""Third-party truth for NVFP4 padding: compressed-tensors 0.20's own NVFP4 decompressor
(`NVFP4PackedCompressor.decompress`, scheme parsed from the checkpoint's config.json by `QuantizationConfig`)
decodes every padded module of a padded compressed-tensors NVFP4 checkpoint: padded rows / columns are exactly
0, everything else is bit-identical to what it decodes from the unpadded source. ModelOpt NVFP4 stores the same
codes and block scales under other names (weight / weight_scale_2 = 1 / global); it is decoded by the same
decompressor after renaming, with weight_global_scale = 1 / weight_scale_2.

Missing oracle packages (torch, compressed-tensors) skip these tests locally (`bash .ci/oracles.sh`
installs them) and fail them when the CI environment variable is set (tests/oracle_env.py).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.factory_fp4 import Fp4Model, build_nvfp4, load_raw
from tests.oracle_env import missing

pytestmark = pytest.mark.oracle

MODELS = {"dense": Fp4Model(), "moe": Fp4Model(arch="qwen3_moe", experts=2, moe_intermediate=464, intermediate=928),
          "fused": Fp4Model(arch="phi3")}


def _oracle():
    try:
        import torch
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means the oracle is unavailable
        missing("compressed-tensors NVFP4 decompressor (torch + compressed-tensors)", exc)
    return torch, NVFP4PackedCompressor, QuantizationConfig


def _decode(torch, compressor, scheme, raw: dict, prefix: str, flavour: str) -> np.ndarray:
    if flavour == "ct":
        sd = {"weight_packed": torch.from_numpy(raw[f"{prefix}.weight_packed"].copy()),
              "weight_scale": torch.from_numpy(raw[f"{prefix}.weight_scale"].copy()).view(torch.float8_e4m3fn),
              "weight_global_scale": torch.from_numpy(raw[f"{prefix}.weight_global_scale"].copy())}
    else:
        scale_2 = np.asarray(raw[f"{prefix}.weight_scale_2"], np.float32).reshape(1)
        sd = {"weight_packed": torch.from_numpy(raw[f"{prefix}.weight"].copy()),
              "weight_scale": torch.from_numpy(raw[f"{prefix}.weight_scale"].copy()).view(torch.float8_e4m3fn),
              "weight_global_scale": torch.from_numpy((1.0 / scale_2).astype(np.float32))}
    return compressor.decompress(sd, scheme)["weight"].to(torch.float64).numpy()


@pytest.mark.parametrize("flavour", ["ct", "modelopt"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_compressed_tensors_decodes_padding_to_zero(tmp_path, kind, flavour):
    torch, compressor, QuantizationConfig = _oracle()
    model = MODELS[kind]
    fx = build_nvfp4(tmp_path / "src", model, flavour)
    proc = subprocess.run([sys.executable, "-m", "awqpad", "pad", tmp_path / "src", tmp_path / "out", "--tp", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from tests.factory_fp4 import ct_quant_config

    qc = QuantizationConfig.model_validate(ct_quant_config())
    scheme = next(iter(qc.config_groups.values()))
    src, out = load_raw(tmp_path / "src"), load_raw(tmp_path / "out")
    checked = zeros = 0
    for prefix in fx.quantized:
        before = _decode(torch, compressor, scheme, src, prefix, flavour)
        after = _decode(torch, compressor, scheme, out, prefix, flavour)
        if after.shape == before.shape:
            assert np.array_equal(after, before), prefix
            continue
        n, k = before.shape
        if after.shape[1] != k:  # down_proj: appended inputs
            assert np.array_equal(after[:, :k], before) and not after[:, k:].any(), prefix
            zeros += after[:, k:].size
        elif prefix.endswith("gate_up_proj"):  # each half padded
            w, new = n // 2, after.shape[0] // 2
            assert np.array_equal(after[:w], before[:w]) and not after[w:new].any(), prefix
            assert np.array_equal(after[new : new + w], before[w:]) and not after[new + w :].any(), prefix
            zeros += after[w:new].size + after[new + w :].size
        else:  # gate / up: appended outputs
            assert np.array_equal(after[:n], before) and not after[n:].any(), prefix
            zeros += after[n:].size
        checked += 1
    assert checked >= 2 * model.layers and zeros > 0, "the oracle compared nothing"
