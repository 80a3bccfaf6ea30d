"""Tiny real FP4 checkpoints for tests, numpy only and independent of awqpad.

* NVFP4 in both on-disk flavours: compressed-tensors `nvfp4-pack-quantized` (weight_packed U8 [N, K/2],
  weight_scale F8_E4M3 [N, K/16], weight_global_scale F32 [1], input_global_scale F32 [1]) and NVIDIA
  ModelOpt (weight U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_scale_2 F32 [], input_scale F32 [];
  quantization_config and/or hf_quant_config.json). Layouts from compressed-tensors 0.20
  `compressors/nvfp4/helpers.py` (value 2i in the LOW nibble of byte i) and vLLM `modelopt.py`.
  Weights are quantized round-to-nearest from random floats (global scale amax / (6 * 448) as ModelOpt
  and llm-compressor compute it), so the checkpoint is what a quantizer writes; `Fixture.weights` holds
  the float64 weight the stored bytes dequantize to, computed here with a table written from the
  e2m1 / e4m3fn definitions (not awqpad's).
* MXFP4 (gpt-oss `*_blocks` / `*_scales`) and bitsandbytes-shaped checkpoints, for recognition only.

Architectures: qwen2 (dense gate/up/down), phi3 (fused gate_up), qwen3_moe (experts), qwen2_moe (experts
+ shared expert). Unquantized tensors (norms, embeddings, lm_head, routers) are BF16.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_MAX, E4M3_MAX = 6.0, 448.0
NBYTES = {"U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F32": 4, "I8": 1}


def e4m3fn_value(byte: int) -> float:
    """OCP e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F / 0xFF are NaN, no infinities."""
    s = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


E4M3 = np.array([e4m3fn_value(b) for b in range(256)])
_POS = np.array([b for b in range(0x7F)])  # finite non-negative bytes in increasing value order


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """Round non-negative floats to the nearest e4m3fn byte (saturating at 448)."""
    vals = E4M3[_POS]
    x = np.clip(x, 0, E4M3_MAX)
    idx = np.clip(np.searchsorted(vals, x), 1, len(vals) - 1)
    lower = np.abs(x - vals[idx - 1]) <= np.abs(vals[idx] - x)
    return _POS[np.where(lower, idx - 1, idx)].astype(np.uint8)


def to_e2m1(x: np.ndarray) -> np.ndarray:
    """Nearest e2m1 code (sign bit 0x8 | magnitude index), ties to the smaller magnitude."""
    mags = E2M1[:8]
    a = np.clip(np.abs(x), 0, FP4_MAX)
    idx = np.argmin(np.abs(a[..., None] - mags), axis=-1).astype(np.uint8)
    return idx | np.where((x < 0) & (idx > 0), 8, 0).astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out


def dequant_nvfp4(packed: np.ndarray, scale_bytes: np.ndarray, global_scale: float, flavour: str) -> np.ndarray:
    """float64 W [N, K]: e2m1 * e4m3(block) / global (compressed-tensors) or * scale_2 (ModelOpt)."""
    codes = unpack_nibbles(packed)
    s = np.repeat(E4M3[scale_bytes], 16, axis=1)[:, : codes.shape[1]]
    w = E2M1[codes] * s
    return w / global_scale if flavour == "ct" else w * global_scale


def quantize_nvfp4(w: np.ndarray, flavour: str) -> dict:
    """Round-to-nearest NVFP4 of float W [N, K] (K % 16 == 0): the stored arrays of one linear."""
    n, k = w.shape
    amax = float(np.abs(w).max()) or 1.0
    scale_2 = amax / (FP4_MAX * E4M3_MAX)  # ModelOpt weight_scale_2; compressed-tensors stores 1 / scale_2
    groups = w.reshape(n, k // 16, 16)
    block = to_e4m3(np.abs(groups).max(axis=2) / FP4_MAX / scale_2)
    denom = (E4M3[block] * scale_2)[..., None]
    codes = to_e2m1(np.divide(groups, denom, out=np.zeros_like(groups), where=denom > 0)).reshape(n, k)
    g = np.float32(scale_2 if flavour == "modelopt" else 1.0 / scale_2)
    return {"packed": pack_nibbles(codes), "scale": block, "global": g, "codes": codes}


def _bf16(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class Fp4Model:
    arch: str = "qwen2"  # qwen2 | phi3 | qwen3_moe | qwen2_moe
    hidden: int = 128
    intermediate: int = 464  # 29 groups of 16 (Nemotron-3-Nano's 1856 / 4): TP 2/4/8 split a group
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 96
    experts: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0


@dataclass
class Fixture:
    path: Path
    model: Fp4Model
    flavour: str  # ct | modelopt
    config: dict
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # prefix -> float64 W the bytes dequantize to
    quantized: dict[str, dict] = field(default_factory=dict)  # prefix -> quantize_nvfp4 output
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def _linears(m: Fp4Model) -> list[tuple[str, int, int, str]]:
    """(prefix, N, K, role) of every decoder linear, in state-dict order."""
    out = []
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for L in range(m.layers):
        p = f"model.layers.{L}"
        if m.arch == "phi3":
            out += [(f"{p}.self_attn.qkv_proj", q + 2 * kv, m.hidden, "qkv"), (f"{p}.self_attn.o_proj", m.hidden, q, "o")]
        else:
            out += [(f"{p}.self_attn.{n}_proj", d, m.hidden, n) for n, d in (("q", q), ("k", kv), ("v", kv))]
            out.append((f"{p}.self_attn.o_proj", m.hidden, q, "o"))
        if m.arch == "phi3":
            out += [(f"{p}.mlp.gate_up_proj", 2 * m.intermediate, m.hidden, "gate_up"),
                    (f"{p}.mlp.down_proj", m.hidden, m.intermediate, "down")]
        elif m.arch in ("qwen3_moe", "qwen2_moe"):
            out.append((f"{p}.mlp.gate", m.experts, m.hidden, "router"))
            for e in range(m.experts):
                out += _gated(f"{p}.mlp.experts.{e}", m.hidden, m.moe_intermediate)
            if m.arch == "qwen2_moe":
                out += _gated(f"{p}.mlp.shared_expert", m.hidden, m.shared_intermediate)
                out.append((f"{p}.mlp.shared_expert_gate", 1, m.hidden, "router"))
        else:
            out += _gated(f"{p}.mlp", m.hidden, m.intermediate)
    return out


def _gated(p: str, h: int, i: int) -> list:
    return [(f"{p}.gate_proj", i, h, "gate"), (f"{p}.up_proj", i, h, "up"), (f"{p}.down_proj", h, i, "down")]


def _config(m: Fp4Model) -> dict:
    base = {"hidden_size": m.hidden, "intermediate_size": m.intermediate, "num_hidden_layers": m.layers,
            "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "vocab_size": m.vocab, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    arch = {"qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}[m.arch]
    cfg = {"architectures": [arch], "model_type": m.arch, **base}
    if m.arch in ("qwen3_moe", "qwen2_moe"):
        cfg.update(moe_intermediate_size=m.moe_intermediate, num_experts=m.experts, num_experts_per_tok=2,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=m.arch == "qwen3_moe")
    if m.arch == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = m.shared_intermediate
    return cfg


CT_SCHEME = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
             "dynamic": False, "observer": "minmax"}


def ct_quant_config(w4a4: bool = True) -> dict:
    group = {"targets": ["Linear"], "weights": dict(CT_SCHEME), "output_activations": None,
             "input_activations": dict(CT_SCHEME, dynamic="local") if w4a4 else None}
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
            "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}


MODELOPT_EXCLUDE = ["lm_head", "model.layers.*.mlp.gate", "model.layers.*.mlp.shared_expert_gate"]


class Shape(tuple):
    """Stands in for an array when only the header is written (`data=False`: sparse files)."""

    @property
    def shape(self):
        return tuple(self)


def write_safetensors(path: Path, arrays: dict[str, tuple[str, np.ndarray]], shards: int = 2) -> dict[str, str]:
    """Write (dtype, raw array or Shape) tensors into `shards` files (+ index when > 1); returns name -> file.
    A file whose tensors are all Shapes gets its header and a hole of the right size (a sparse file)."""
    names = list(arrays)
    per = math.ceil(len(names) / max(1, shards))
    chunks = [names[i : i + per] for i in range(0, len(names), per)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = "model.safetensors" if len(chunks) == 1 else f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
        for name in chunk:
            dtype, a = arrays[name]
            size = NBYTES[dtype] * math.prod(a.shape)
            if not isinstance(a, Shape):
                raw = np.ascontiguousarray(a).tobytes()
                assert len(raw) == size, name
                blobs.append(raw)
            header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = fname
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        with open(path / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(body)) + body + b"".join(blobs))
            fh.truncate(8 + len(body) + offset)
    if len(chunks) > 1:
        total = sum(NBYTES[d] * math.prod(a.shape) for d, a in arrays.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


def build_nvfp4(path, model: Fp4Model = Fp4Model(), flavour: str = "ct", *, shards: int = 2, seed: int = 0,
                modelopt_side_file: bool = True, modelopt_in_config: bool = True, w4a4: bool = True,
                data: bool = True) -> Fixture:
    """An NVFP4 checkpoint of `model` in `flavour` ("ct" | "modelopt") at `path`.
    `data=False`: headers only (sparse files), for planning real model shapes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cfg = _config(model)
    fx = Fixture(path, model, flavour, cfg)
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    arrays["model.embed_tokens.weight"] = ("BF16", _bf16(rng.normal(0, 0.02, (model.vocab, model.hidden))))
    gate_up_scale: dict[str, np.float32] = {}
    for prefix, n, k, role in _linears(model):
        if not data:
            _shapes_only(arrays, prefix, n, k, role, flavour, w4a4)
            continue
        w = rng.normal(0, 0.05, (n, k))
        if role == "router":
            arrays[f"{prefix}.weight"] = ("BF16", _bf16(w))
            continue
        q = quantize_nvfp4(w, flavour)
        if flavour == "modelopt" and role in ("gate", "up"):
            # vLLM's fused w13 expects gate and up to share weight_scale_2: requantize up with gate's.
            mlp = prefix.rpartition(".")[0]
            if role == "gate":
                gate_up_scale[mlp] = q["global"]
            else:
                q = _requantize(w, gate_up_scale[mlp])
        fx.quantized[prefix] = q
        fx.weights[prefix] = dequant_nvfp4(q["packed"], q["scale"], float(q["global"]), flavour)
        act = np.float32(rng.uniform(0.5, 2.0))
        if flavour == "ct":
            arrays[f"{prefix}.weight_packed"] = ("U8", q["packed"])
            arrays[f"{prefix}.weight_scale"] = ("F8_E4M3", q["scale"])
            arrays[f"{prefix}.weight_global_scale"] = ("F32", np.array([q["global"]], np.float32))
            if w4a4:
                arrays[f"{prefix}.input_global_scale"] = ("F32", np.array([act], np.float32))
        else:
            arrays[f"{prefix}.weight"] = ("U8", q["packed"])
            arrays[f"{prefix}.weight_scale"] = ("F8_E4M3", q["scale"])
            arrays[f"{prefix}.weight_scale_2"] = ("F32", np.array(q["global"], np.float32))
            arrays[f"{prefix}.input_scale"] = ("F32", np.array(act, np.float32))
        if role == "o":
            L = prefix.split(".")[2]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                arrays[f"model.layers.{L}.{norm}.weight"] = ("BF16", _bf16(1 + rng.normal(0, 0.1, model.hidden)))
    arrays["model.norm.weight"] = ("BF16", _bf16(np.ones(model.hidden)))
    arrays["lm_head.weight"] = ("BF16", _bf16(rng.normal(0, 0.02, (model.vocab, model.hidden))))
    fx.tensors = {k: (d, tuple(a.shape)) for k, (d, a) in arrays.items()}
    write_safetensors(path, arrays, shards)
    if flavour == "ct":
        cfg["quantization_config"] = ct_quant_config(w4a4)
    else:
        body = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": MODELOPT_EXCLUDE}
        if modelopt_in_config:
            cfg["quantization_config"] = {"quant_method": "modelopt", **body}
        if modelopt_side_file:
            (path / "hf_quant_config.json").write_text(json.dumps(
                {"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": body}, indent=2))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return fx


def _shapes_only(arrays: dict, prefix: str, n: int, k: int, role: str, flavour: str, w4a4: bool) -> None:
    if role == "router":
        arrays[f"{prefix}.weight"] = ("BF16", Shape((n, k)))
        return
    main = "weight_packed" if flavour == "ct" else "weight"
    arrays[f"{prefix}.{main}"] = ("U8", Shape((n, k // 2)))
    arrays[f"{prefix}.weight_scale"] = ("F8_E4M3", Shape((n, k // 16)))
    one = (1,) if flavour == "ct" else ()
    arrays[f"{prefix}.{'weight_global_scale' if flavour == 'ct' else 'weight_scale_2'}"] = ("F32", Shape(one))
    if flavour == "modelopt" or w4a4:
        arrays[f"{prefix}.{'input_global_scale' if flavour == 'ct' else 'input_scale'}"] = ("F32", Shape(one))


def _requantize(w: np.ndarray, scale_2: np.float32) -> dict:
    n, k = w.shape
    groups = w.reshape(n, k // 16, 16)
    block = to_e4m3(np.abs(groups).max(axis=2) / FP4_MAX / float(scale_2))
    denom = (E4M3[block] * float(scale_2))[..., None]
    codes = to_e2m1(np.divide(groups, denom, out=np.zeros_like(groups), where=denom > 0)).reshape(n, k)
    return {"packed": pack_nibbles(codes), "scale": block, "global": scale_2, "codes": codes}


# --- recognition-only checkpoints ---------------------------------------------------------------------


def build_mxfp4(path, *, hidden: int = 128, intermediate: int = 2880 // 10, experts: int = 4, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, head_dim: int = 32, with_config: bool = True, seed: int = 0) -> Path:
    """gpt-oss-shaped MXFP4: experts as *_blocks U8 [E, N, K/32, 16] + *_scales U8 [E, N, K/32] (E8M0) + biases."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, tuple[str, np.ndarray]] = {"model.embed_tokens.weight": ("BF16", _bf16(rng.normal(0, 0.02, (96, hidden))))}
    for L in range(layers):
        p = f"model.layers.{L}"
        for n, d in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            arrays[f"{p}.self_attn.{n}_proj.weight"] = ("BF16", _bf16(rng.normal(0, 0.05, (d, hidden))))
        arrays[f"{p}.self_attn.o_proj.weight"] = ("BF16", _bf16(rng.normal(0, 0.05, (hidden, heads * head_dim))))
        arrays[f"{p}.mlp.router.weight"] = ("BF16", _bf16(rng.normal(0, 0.05, (experts, hidden))))
        for name, n, k in (("gate_up_proj", 2 * intermediate, hidden), ("down_proj", hidden, intermediate)):
            arrays[f"{p}.mlp.experts.{name}_blocks"] = ("U8", rng.integers(0, 256, (experts, n, k // 32, 16), dtype=np.uint8))
            arrays[f"{p}.mlp.experts.{name}_scales"] = ("U8", rng.integers(118, 128, (experts, n, k // 32), dtype=np.uint8))
            arrays[f"{p}.mlp.experts.{name}_bias"] = ("BF16", _bf16(rng.normal(0, 0.01, (experts, n))))
    write_safetensors(path, arrays, 1)
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
           "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_local_experts": experts,
           "experts_per_token": 2, "vocab_size": 96, "torch_dtype": "bfloat16"}
    if with_config:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def build_bnb(path, *, kind: str = "nf4", hidden: int = 128, intermediate: int = 464, layers: int = 1,
              with_config: bool = True, seed: int = 0) -> Path:
    """bitsandbytes-shaped (as transformers save_pretrained writes it): 4-bit `weight` U8 [N*K/2, 1] with
    `weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__<kind>`; int8 `weight` I8 + `SCB`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    for L in range(layers):
        p = f"model.layers.{L}"
        shapes = {f"{p}.self_attn.q_proj": (hidden, hidden), f"{p}.self_attn.k_proj": (hidden // 2, hidden),
                  f"{p}.self_attn.v_proj": (hidden // 2, hidden), f"{p}.self_attn.o_proj": (hidden, hidden),
                  f"{p}.mlp.gate_proj": (intermediate, hidden), f"{p}.mlp.up_proj": (intermediate, hidden),
                  f"{p}.mlp.down_proj": (hidden, intermediate)}
        for prefix, (n, k) in shapes.items():
            if kind == "int8":
                arrays[f"{prefix}.weight"] = ("I8", rng.integers(-127, 128, (n, k), dtype=np.int8))
                arrays[f"{prefix}.SCB"] = ("F32", rng.uniform(0.01, 0.1, n).astype(np.float32))
                continue
            arrays[f"{prefix}.weight"] = ("U8", rng.integers(0, 256, (n * k // 2, 1), dtype=np.uint8))
            arrays[f"{prefix}.weight.absmax"] = ("F32", rng.uniform(0.01, 0.1, n * k // 64).astype(np.float32))
            arrays[f"{prefix}.weight.quant_map"] = ("F32", np.linspace(-1, 1, 16).astype(np.float32))
            state = json.dumps({"quant_type": kind, "blocksize": 64, "dtype": "bfloat16", "shape": [n, k]}).encode()
            arrays[f"{prefix}.weight.quant_state.bitsandbytes__{kind}"] = ("U8", np.frombuffer(state, np.uint8).copy())
    write_safetensors(path, arrays, 1)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
           "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 96, "torch_dtype": "bfloat16"}
    if with_config:
        cfg["quantization_config"] = ({"quant_method": "bitsandbytes", "load_in_8bit": True} if kind == "int8" else
                                      {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": kind,
                                       "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


RAW = {"U8": np.uint8, "I8": np.int8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
       "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}


def load_raw(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory as numpy (float8 as uint8 bytes, BF16 as uint16 bits)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, e in json.loads(raw[8 : 8 + n]).items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=RAW[e["dtype"]]).reshape(e["shape"])
    return out
