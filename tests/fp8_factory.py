"""Tiny (and header-only huge) FP8 checkpoints for tests, numpy only, independent of awqpad.

`build_fp8(path, Spec(...))` writes config.json and safetensors shards (header encoded here, F8 bytes
written as uint8 arrays) for block-FP8 (`quant_method: fp8`, `weight_scale_inv`) and compressed-tensors
`float-quantized` (block / channel / tensor `weight_scale`) checkpoints of these layouts:

  qwen3 (dense), qwen3_moe, qwen3_next (experts + shared_expert + Gated DeltaNet layers),
  deepseek_v3 (first_k_dense_replace dense layers, routed + shared experts, MLA), minimax_m2
  (block_sparse_moe.experts.N.w1/w3/w2), glm4_moe (DeepSeek-style naming, GQA attention with bias).

It returns, per linear prefix, the float64 weight its stored bytes dequantize to (the reference the
tests compare awqpad's output against). e4m3fn is decoded here by its own formula (sign, 4-bit
exponent with bias 7, 3-bit mantissa; S.1111.111 = NaN), written from the OCP FP8 spec, not from
awqpad's table. Quantization rounds like torch's cast: nearest, ties to even, small negatives to -0.0
(byte 0x80), which is what real checkpoints contain.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.factory import encode_header  # noqa: F401  (also used by the FP8 tests)

NBYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8}
FP8_MAX = 448.0


def e4m3fn_value(code: int) -> float:
    s = -1.0 if code >> 7 else 1.0
    e, m = (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    return s * (math.ldexp(m / 8, -6) if e == 0 else math.ldexp(1 + m / 8, e - 7))


E4M3FN_F64 = np.array([e4m3fn_value(c) for c in range(256)])
_POS = E4M3FN_F64[:127]  # codes 0..126, ascending, finite


def to_e4m3fn(x: np.ndarray) -> np.ndarray:
    """Round float64 values (|x| <= 448) to e4m3fn bytes: nearest, ties to the even code."""
    a = np.abs(x)
    hi = np.clip(np.searchsorted(_POS, a), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = a - _POS[lo], _POS[hi] - a
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return (pick | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


MLA = (96, 64, 64, 128, 128)  # q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim
GDN = (4, 8, 128, 128)  # Qwen3-Next linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim


@dataclass
class Spec:
    arch: str = "qwen3_moe"
    flavour: str = "block"  # block (weight_scale_inv) | tensor (fp8 per-tensor) | ct-block | ct-channel | ct-tensor
    block: tuple[int, int] = (128, 128)
    scale_dtype: str = "F32"  # F32 | BF16 (block-FP8 weight_scale_inv)
    activation_scheme: str = "dynamic"  # static adds per-tensor input_scale
    scale_fmt: str | None = None  # "ue8m0": power-of-two scales
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 384  # dense MLP width
    moe_intermediate: int = 192  # expert width (MiniMax: intermediate_size)
    experts: int = 4
    shared: int = 192  # Qwen3-Next shared_expert_intermediate_size
    n_shared: int = 1  # DeepSeek / GLM shared experts (width = n_shared * moe_intermediate)
    first_k_dense: int = 1
    vocab: int = 512
    linear_every: int = 2  # Qwen3-Next full_attention_interval
    quantize_linear_ba: bool = False  # Qwen3-Next: in_proj_ba in FP8 too (engines then check its per-rank 2 x heads / t)
    mla: tuple = MLA  # DeepSeek: q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim
    gdn: tuple = GDN  # Qwen3-Next: linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim
    extra_config: dict = field(default_factory=dict)


MOE = ("qwen3_moe", "qwen3_next", "deepseek_v3", "minimax_m2", "glm4_moe")
NOT_CONVERTED = ("lm_head", "mlp.gate", "shared_expert_gate", "block_sparse_moe.gate")


def _attn(s: Spec, p: str, layer: int) -> list[tuple[str, str, tuple]]:
    """(name, kind, shape): kind 'lin' (FP8 linear, name is the prefix), 'norm', 'bias', 'plain'."""
    H, hd = s.hidden, s.head_dim
    if s.arch == "deepseek_v3":
        q_lora, kv_lora, rope, nope, v = s.mla
        return [(f"{p}.self_attn.q_a_proj", "lin", (q_lora, H)), (f"{p}.self_attn.q_a_layernorm.weight", "norm", (q_lora,)),
                (f"{p}.self_attn.q_b_proj", "lin", (s.heads * (nope + rope), q_lora)),
                (f"{p}.self_attn.kv_a_proj_with_mqa", "lin", (kv_lora + rope, H)),
                (f"{p}.self_attn.kv_a_layernorm.weight", "norm", (kv_lora,)),
                (f"{p}.self_attn.kv_b_proj", "lin", (s.heads * (nope + v), kv_lora)),
                (f"{p}.self_attn.o_proj", "lin", (H, s.heads * v))]
    if s.arch == "qwen3_next" and (layer + 1) % s.linear_every:
        kh, vh, kd, vd = s.gdn
        return [(f"{p}.linear_attn.in_proj_qkvz", "lin", (2 * kh * kd + 2 * vh * vd, H)),
                (f"{p}.linear_attn.in_proj_ba", "lin" if s.quantize_linear_ba else "plain", (2 * vh, H)),
                (f"{p}.linear_attn.out_proj", "lin", (H, vh * vd)),
                (f"{p}.linear_attn.conv1d.weight", "plain", (2 * kh * kd + vh * vd, 1, 4)),
                (f"{p}.linear_attn.A_log", "plain", (vh,)), (f"{p}.linear_attn.dt_bias", "plain", (vh,)),
                (f"{p}.linear_attn.norm.weight", "norm", (vd,))]
    q_out = s.heads * hd * (2 if s.arch == "qwen3_next" else 1)
    out = [(f"{p}.self_attn.q_proj", "lin", (q_out, H)), (f"{p}.self_attn.k_proj", "lin", (s.kv_heads * hd, H)),
           (f"{p}.self_attn.v_proj", "lin", (s.kv_heads * hd, H)), (f"{p}.self_attn.o_proj", "lin", (H, s.heads * hd))]
    if s.arch == "glm4_moe":
        out += [(f"{p}.self_attn.{x}_proj.bias", "bias", (n,)) for x, n in (("q", q_out), ("k", s.kv_heads * hd), ("v", s.kv_heads * hd))]
    if s.arch in ("qwen3", "qwen3_moe", "qwen3_next"):
        out += [(f"{p}.self_attn.q_norm.weight", "norm", (hd,)), (f"{p}.self_attn.k_norm.weight", "norm", (hd,))]
    if s.arch == "minimax_m2":
        out += [(f"{p}.self_attn.q_norm.weight", "norm", (s.heads * hd,)), (f"{p}.self_attn.k_norm.weight", "norm", (s.kv_heads * hd,))]
    return out


def _gated(prefix: str, H: int, width: int, names=("gate_proj", "up_proj", "down_proj")) -> list:
    g, u, d = names
    return [(f"{prefix}.{g}", "lin", (width, H)), (f"{prefix}.{u}", "lin", (width, H)), (f"{prefix}.{d}", "lin", (H, width))]


def _mlp(s: Spec, p: str, layer: int) -> list:
    H = s.hidden
    if s.arch == "qwen3" or (s.arch in ("deepseek_v3", "glm4_moe") and layer < s.first_k_dense):
        return _gated(f"{p}.mlp", H, s.intermediate)
    out = []
    if s.arch == "minimax_m2":
        out.append((f"{p}.block_sparse_moe.gate.weight", "plain", (s.experts, H)))
        out.append((f"{p}.block_sparse_moe.e_score_correction_bias", "f32", (s.experts,)))
        for e in range(s.experts):
            out += _gated(f"{p}.block_sparse_moe.experts.{e}", H, s.moe_intermediate, ("w1", "w3", "w2"))
        return out
    out.append((f"{p}.mlp.gate.weight", "plain", (s.experts, H)))
    if s.arch in ("deepseek_v3", "glm4_moe"):
        out.append((f"{p}.mlp.gate.e_score_correction_bias", "f32", (s.experts,)))
    for e in range(s.experts):
        out += _gated(f"{p}.mlp.experts.{e}", H, s.moe_intermediate)
    if s.arch in ("deepseek_v3", "glm4_moe"):
        out += _gated(f"{p}.mlp.shared_experts", H, s.n_shared * s.moe_intermediate)
    if s.arch == "qwen3_next":
        out += _gated(f"{p}.mlp.shared_expert", H, s.shared)
        out.append((f"{p}.mlp.shared_expert_gate.weight", "plain", (1, H)))
    return out


def layout(s: Spec) -> list:
    out = [("model.embed_tokens.weight", "plain", (s.vocab, s.hidden))]
    for layer in range(s.layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", "norm", (s.hidden,)), (f"{p}.post_attention_layernorm.weight", "norm", (s.hidden,))]
        out += _attn(s, p, layer) + _mlp(s, p, layer)
    return out + [("model.norm.weight", "norm", (s.hidden,)), ("lm_head.weight", "plain", (s.vocab, s.hidden))]


def scale_shape(s: Spec, n: int, k: int) -> tuple:
    bn, bk = s.block
    return {"block": (-(-n // bn), -(-k // bk)), "ct-block": (-(-n // bn), -(-k // bk)),
            "ct-channel": (n, 1), "ct-tensor": (1,), "tensor": ()}[s.flavour]


def scale_name(s: Spec) -> str:
    return "weight_scale_inv" if s.flavour == "block" else "weight_scale"


def tensor_specs(s: Spec) -> list[tuple[str, str, tuple]]:
    sdt = s.scale_dtype if s.flavour == "block" else "F32"
    out = []
    for name, kind, shape in layout(s):
        if kind == "lin":
            out += [(f"{name}.weight", "F8_E4M3", shape), (f"{name}.{scale_name(s)}", sdt, scale_shape(s, *shape))]
            if s.activation_scheme == "static":
                out.append((f"{name}.input_scale", "F32", (1,) if s.flavour.startswith("ct") else ()))
        elif kind == "f32":
            out.append((name, "F32", shape))
        else:
            out.append((name, "BF16", shape))
    return out


def config(s: Spec) -> dict:
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}[s.arch]
    c = {"architectures": [arch], "model_type": s.arch, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
         "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
         "vocab_size": s.vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16",
         "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 1000000.0}
    if s.arch == "qwen3":
        c["intermediate_size"] = s.intermediate
    elif s.arch == "qwen3_moe":
        c.update(intermediate_size=4 * s.hidden, moe_intermediate_size=s.moe_intermediate, num_experts=s.experts,
                 num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    elif s.arch == "qwen3_next":
        c.update(intermediate_size=4 * s.hidden, moe_intermediate_size=s.moe_intermediate, num_experts=s.experts,
                 num_experts_per_tok=2, shared_expert_intermediate_size=s.shared, full_attention_interval=s.linear_every,
                 linear_conv_kernel_dim=4, **dict(zip(("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                                       "linear_value_head_dim"), s.gdn)), decoder_sparse_step=1, mlp_only_layers=[], partial_rotary_factor=0.25)
    elif s.arch in ("deepseek_v3", "glm4_moe"):
        c.update(intermediate_size=s.intermediate, moe_intermediate_size=s.moe_intermediate, n_routed_experts=s.experts,
                 n_shared_experts=s.n_shared, first_k_dense_replace=s.first_k_dense, num_experts_per_tok=2,
                 n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True)
        if s.arch == "deepseek_v3":
            c.update(dict(zip(("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), s.mla)))
            c.pop("head_dim")
        else:
            c["attention_bias"] = True
    elif s.arch == "minimax_m2":
        c.update(intermediate_size=s.moe_intermediate, num_local_experts=s.experts, num_experts_per_tok=2,
                 scoring_func="sigmoid", use_routing_bias=True)
    c["quantization_config"] = quant_config(s)
    c.update(s.extra_config)
    return c


def quant_config(s: Spec) -> dict:
    ignore = list(NOT_CONVERTED) + (["in_proj_ba"] if s.arch == "qwen3_next" and not s.quantize_linear_ba else [])
    if s.flavour in ("block", "tensor"):
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": s.activation_scheme, "modules_to_not_convert": ignore}
        if s.flavour == "block":
            q["weight_block_size"] = list(s.block)
        if s.scale_fmt:
            q["scale_fmt"] = s.scale_fmt
        return q
    strategy = s.flavour[3:]
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": list(s.block) if strategy == "block" else None}
    if s.activation_scheme == "static":
        acts = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    else:
        acts = {"num_bits": 8, "type": "float", "strategy": "group" if strategy == "block" else "token",
                "group_size": s.block[1] if strategy == "block" else None, "symmetric": True, "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "re:.*block_sparse_moe\\.gate$",
                       "re:.*in_proj_ba$"] if not s.quantize_linear_ba else ["lm_head", "re:.*mlp\\.gate$"]}


def _quantize(s: Spec, w: np.ndarray):
    """FP8 codes, stored scale array and the float64 weight they dequantize to."""
    n, k = w.shape
    shape = scale_shape(s, n, k)
    bn, bk = s.block
    if s.flavour in ("block", "ct-block"):
        gn, gk = shape
        pad = np.zeros((gn * bn, gk * bk))
        pad[:n, :k] = np.abs(w)
        scale = np.maximum(pad.reshape(gn, bn, gk, bk).max(axis=(1, 3)), 1e-8) / FP8_MAX
    elif s.flavour == "ct-channel":
        scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-8) / FP8_MAX
    else:
        scale = np.array(max(np.abs(w).max(), 1e-8) / FP8_MAX).reshape(shape)
    if s.scale_fmt == "ue8m0":
        scale = np.exp2(np.ceil(np.log2(scale)))
    if s.flavour == "block" and s.scale_dtype == "BF16":
        stored = bf16_bits(scale)
        value = bf16_value(stored)
    else:
        stored = scale.astype(np.float32)
        value = stored.astype(np.float64)
    full = _expand(value, s, n, k)
    codes = to_e4m3fn(np.clip(w / full, -FP8_MAX, FP8_MAX))
    return codes, stored, E4M3FN_F64[codes] * full


def _expand(scale: np.ndarray, s: Spec, n: int, k: int) -> np.ndarray:
    bn, bk = s.block
    if s.flavour in ("block", "ct-block"):
        return np.repeat(np.repeat(scale, bn, 0), bk, 1)[:n, :k]
    if s.flavour == "ct-channel":
        return np.broadcast_to(scale.reshape(n, 1), (n, k))
    return np.full((n, k), float(scale.reshape(-1)[0]))


@dataclass
class Built:
    path: Path
    spec: Spec
    config: dict
    weights: dict[str, np.ndarray]  # linear prefix -> float64 dequantized weight
    plain: dict[str, np.ndarray]  # other tensors, float64
    names: list[str]  # tensor names in file order


def build_fp8(path, s: Spec = Spec(), *, data: bool = True, seed: int = 0, shards: int = 2) -> Built:
    """Write the checkpoint; data=False writes sparse header-only shards (right headers, no bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(s)
    rng = np.random.default_rng(seed)
    blobs: dict[str, bytes] = {}
    weights: dict[str, np.ndarray] = {}
    plain: dict[str, np.ndarray] = {}
    if data:
        sdt = s.scale_dtype if s.flavour == "block" else "F32"
        for name, kind, shape in layout(s):
            if kind == "lin":
                w = rng.standard_normal(shape) * (0.5 / math.sqrt(shape[1]))
                codes, stored, deq = _quantize(s, w)
                blobs[f"{name}.weight"] = codes.tobytes()
                blobs[f"{name}.{scale_name(s)}"] = stored.astype("<u2" if sdt == "BF16" else "<f4").tobytes()
                if s.activation_scheme == "static":
                    blobs[f"{name}.input_scale"] = np.array([0.02], "<f4").tobytes()
                weights[name] = deq
            else:
                v = (1.0 + 0.1 * rng.standard_normal(shape)) if kind == "norm" else 0.02 * rng.standard_normal(shape)
                if kind == "f32":
                    blobs[name] = v.astype("<f4").tobytes()
                    plain[name] = v.astype(np.float32).astype(np.float64)
                else:
                    bits = bf16_bits(v)
                    blobs[name] = bits.astype("<u2").tobytes()
                    plain[name] = bf16_value(bits)
    groups = _split(specs, shards)
    files = ["model.safetensors"] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for fname, grp in zip(files, groups):
        head, nbytes = encode_header(grp, {"format": "pt"})
        with open(path / fname, "wb") as fh:
            fh.write(head)
            if data:
                for name, _, _ in grp:
                    fh.write(blobs[name])
        if not data:
            os.truncate(path / fname, len(head) + nbytes)
    if len(files) > 1:
        total = sum(NBYTES[dt] * math.prod(sh) for _, dt, sh in specs)
        wm = {name: f for f, grp in zip(files, groups) for name, _, _ in grp}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    cfg = config(s)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    return Built(path, s, cfg, weights, plain, [n for n, _, _ in specs])


def _split(specs: list, shards: int) -> list[list]:
    sizes = [NBYTES[dt] * math.prod(sh) for _, dt, sh in specs]
    total = max(sum(sizes), 1)
    out: list[list] = [[] for _ in range(max(1, shards))]
    before = 0
    for spec, n in zip(specs, sizes):
        out[min(len(out) - 1, before * len(out) // total)].append(spec)
        before += n
    return [g for g in out if g]


def read_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint dir as (dtype, raw numpy array: F8 as uint8, BF16 as uint16 bits)."""
    raw_types = {"F8_E4M3": np.uint8, "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I64": np.int64}
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            a, b = e["data_offsets"]
            arr = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=np.dtype(raw_types[e["dtype"]]).newbyteorder("<"))
            out[name] = (e["dtype"], arr.reshape(e["shape"]))
    return out


def dequant(tensors: dict, prefix: str, s: Spec, block: tuple[int, int] | None = None) -> np.ndarray:
    """float64 weight of linear `prefix` from raw tensors (as read_tensors gives them)."""
    _, codes = tensors[f"{prefix}.weight"]
    sdt, scale = tensors[f"{prefix}.{scale_name(s)}"]
    sc = bf16_value(scale) if sdt == "BF16" else scale.astype(np.float64)
    n, k = codes.shape
    spec = s if block is None else Spec(flavour=s.flavour, block=block)
    return E4M3FN_F64[codes] * _expand(sc, spec, n, k)
