"""One attention block in float64, unsharded and tensor-parallel, to check head padding exactly.

The block is the decoder self-attention as the HF reference code and vLLM compute it:

  q = x Wq^T + bq, k = x Wk^T + bk, v = x Wv^T + bv       (per head of head_dim)
  q, k <- RMSNorm over head_dim (Qwen3 q_norm / k_norm, when the checkpoint has them)
  q, k <- RoPE (NeoX rotate-half; ChatGLM: interleaved pairs on half of head_dim)
  query head i reads KV head i // (heads / kv_heads)        (HF repeat_kv)
  causal softmax(q k^T * scale) v, heads concatenated, y = ctx Wo^T (+ bo)

Weights are dequantized from the checkpoint's own tensors with the format's dequantizer
(formats/*.dequantize, through simulate.dequantize), under every reader variant of the format.

attention_sharded runs the block on t simulated ranks the way vLLM shards it: rank r owns query
heads [r h/t, (r+1) h/t) and KV heads [r kv/t, ...) -- or, when t > kv, the single KV head
r // (t / kv), replicated (QKVParallelLinear); a fused qkv tensor is split into its q, k and v parts
first. Each rank slices the PACKED tensors (simulate.take: whole words, whole scale groups, g_idx as
vLLM shards it), dequantizes its own shard, maps local query head j to local KV head
j // (h_r / kv_r), and the row-parallel o_proj partial outputs are summed (the all-reduce).

compare_attention(src, out) runs the unpadded source unsharded (the truth) against the padded output
unsharded and at every TP given, on the same random input, for sampled layers; padding is exact when
every relative error is at summation-order level (<= REL_TOL). Zero query heads appended after the last
KV group of a GQA model shift real heads into other KV groups: that is caught here (errors ~1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from awqpad.checkpoint import formats
from awqpad.verify import simulate_mlp as simulate
from awqpad.checkpoint.model import Checkpoint, Linear
from awqpad.checkpoint.formats.base import to_float64
from awqpad.verify.simulate_mlp import ShardError, relative_error, take
from awqpad.execute.tensor_io import read_array

REL_TOL = 1e-12
NORM_KEYS = {"q": ("q_norm", "q_layernorm"), "k": ("k_norm", "k_layernorm")}


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0: the whole head_dim
    rope_style: str = "neox"  # neox (rotate half) | gptj (interleaved pairs)
    eps: float = 1e-6
    scale: float = 0.0  # 0: head_dim ** -0.5
    layout: str = "separate"  # separate | fused ([q; k; v]) | grouped (InternLM2 [(q.., k, v) per group])

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class AttentionData:
    """One layer's attention: its linears and their packed tensors, plus q/k norm weights."""

    spec: AttentionSpec
    layer: int
    linears: dict[str, Linear]  # role -> Linear (q, k, v, o or qkv, o)
    arrays: dict[str, dict[str, np.ndarray]]  # linear prefix -> {part: raw array}
    norms: dict[str, np.ndarray] = field(default_factory=dict)  # "q"/"k" -> [head_dim] float64

    def bias(self, linear: Linear, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        raw = self.arrays[linear.prefix].get("bias")
        if raw is None:
            return None
        return to_float64(raw, linear.parts["bias"].dtype)[start:stop]


# --- loading -------------------------------------------------------------------------------------


def spec_for(ckpt: Checkpoint) -> AttentionSpec:
    cfg, dims = ckpt.config, ckpt.dims
    if not dims.heads or not dims.head_dim:
        raise ValueError("checkpoint has no attention head count / head_dim")
    d = dims.head_dim
    fam = ckpt.family.name
    partial = cfg.get("partial_rotary_factor") or 1.0
    rotary = int(d * partial)
    style = "neox"
    if fam == "chatglm":
        rotary, style = d // 2, "gptj"
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    if fam == "chatglm":
        theta = 10000.0 * float(cfg.get("rope_ratio") or 1.0)
    eps = cfg.get("rms_norm_eps") or cfg.get("layernorm_epsilon") or 1e-6
    scalar = cfg.get("query_pre_attn_scalar")
    layout = "separate"
    roles = {lin.role for lin in ckpt.linears if lin.block == "attn"}
    if "qkv" in roles:
        layout = "grouped" if fam == "internlm2" else "fused"
    return AttentionSpec(dims.heads, dims.kv_heads or dims.heads, d, dims.hidden or 0, float(theta), rotary, style,
                         float(eps), float(scalar) ** -0.5 if scalar else 0.0, layout)


def attention_layers(ckpt: Checkpoint) -> tuple[int, ...]:
    """Layers with q, k, v (or fused qkv) and o: MLA and linear-attention layers are not simulated here."""
    roles: dict[int, set] = {}
    for lin in (lin for lin in ckpt.linears if lin.block == "attn" and lin.layer is not None):
        roles.setdefault(lin.layer, set()).add(lin.role)
    return tuple(sorted(k for k, r in roles.items() if "o" in r and ({"q", "k", "v"} <= r or "qkv" in r)))


def load_attention(ckpt: Checkpoint, layer: int) -> AttentionData:
    root = ckpt.source.root
    linears = {lin.role: lin for lin in ckpt.linears if lin.block == "attn" and lin.layer == layer}
    if "o" not in linears:
        raise ValueError(f"layer {layer}: no attention o_proj")
    arrays = {lin.prefix: {part: read_array(root, info) for part, info in lin.parts.items()} for lin in linears.values()}
    module = linears["o"].prefix.rpartition(".")[0]
    norms = {}
    for which, names in NORM_KEYS.items():
        for name in names:
            info = ckpt.tensors.get(f"{module}.{name}.weight")
            if info is not None:
                norms[which] = to_float64(read_array(root, info), info.dtype)
    return AttentionData(spec_for(ckpt), layer, linears, arrays, norms)


# --- math ----------------------------------------------------------------------------------------


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """x [S, n, d] rotated by position (the first rotary_dim features of every head)."""
    rd = spec.rotary_dim or spec.head_dim
    inv = 1.0 / spec.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    ang = positions[:, None].astype(np.float64) * inv[None, :]  # [S, rd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    rot, rest = x[..., :rd], x[..., rd:]
    if spec.rope_style == "gptj":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
    else:
        a, b = rot[..., : rd // 2], rot[..., rd // 2:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return np.concatenate([out, rest], axis=-1)


def _heads_context(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_of: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """q [S, n, d], k/v [S, m, d]; query head j reads KV head kv_of[j]. Returns ctx [S, n*d]."""
    s, n, d = q.shape
    scale = spec.scale or d ** -0.5
    kk, vv = k[:, kv_of, :], v[:, kv_of, :]  # [S, n, d]
    scores = np.einsum("snd,tnd->nst", q, kk) * scale
    mask = np.triu(np.ones((s, s), dtype=bool), 1)
    scores = np.where(mask[None], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    ctx = np.einsum("nst,tnd->snd", p, vv)
    return ctx.reshape(s, n * d)


def attention_from_weights(wq, wk, wv, wo, x: np.ndarray, spec: AttentionSpec, biases: dict | None = None,
                           norms: dict | None = None, positions: np.ndarray | None = None) -> np.ndarray:
    """The unsharded block from float64 matrices W [out, in] (HF repeat_kv mapping). biases: q/k/v/o -> [out]."""
    biases = {key: b for key, b in (biases or {}).items() if b is not None}
    norms = norms or {}
    s = x.shape[0]
    positions = np.arange(s) if positions is None else positions
    h, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    q = (x @ wq.T + biases.get("q", 0.0)).reshape(s, h, d)
    k = (x @ wk.T + biases.get("k", 0.0)).reshape(s, kv, d)
    v = (x @ wv.T + biases.get("v", 0.0)).reshape(s, kv, d)
    q, k = _norm_rope(q, k, positions, spec, norms)
    ctx = _heads_context(q, k, v, np.arange(h) // (h // kv), spec)
    y = ctx @ wo.T
    return y + biases["o"] if "o" in biases else y


def _norm_rope(q, k, positions, spec, norms):
    if "q" in norms:
        q = _rms(q, norms["q"], spec.eps)
    if "k" in norms:
        k = _rms(k, norms["k"], spec.eps)
    return rope(q, positions, spec), rope(k, positions, spec)


# --- the block from packed tensors ----------------------------------------------------------------


def _row_ranges(spec: AttentionSpec, part: str, first: int, count: int) -> list[tuple[int, int]]:
    """Output rows of heads [first, first+count) of `part` (q | k | v) in the projection that holds them."""
    h, kv, d, r = spec.heads, spec.kv_heads, spec.head_dim, spec.group
    if spec.layout == "separate":
        return [(first * d, (first + count) * d)]
    if spec.layout == "fused":
        base = {"q": 0, "k": h * d, "v": (h + kv) * d}[part]
        return [(base + first * d, base + (first + count) * d)]
    size = (r + 2) * d  # grouped: per KV group [q_1..q_r, k, v]
    out = []
    for head in range(first, first + count):
        if part == "q":
            g, i = divmod(head, r)
            out.append((g * size + i * d, g * size + (i + 1) * d))
        else:
            out.append((head * size + (r + (0 if part == "k" else 1)) * d, head * size + (r + (1 if part == "k" else 2)) * d))
    return out


def _project(data: AttentionData, part: str, first: int, count: int, x: np.ndarray, reader: str) -> np.ndarray:
    """x @ W_part^T + b for heads [first, first+count) of q | k | v, from packed slices. [S, count*d]."""
    lin = data.linears.get(part) or data.linears["qkv"]
    arrays = data.arrays[lin.prefix]
    outs = []
    for start, stop in _merge_ranges(_row_ranges(data.spec, part, first, count)):
        piece = take(arrays, lin, "out", start, stop)
        w = simulate.dequantize(piece, replace(lin, out_features=stop - start), reader)
        y = x @ w.T
        b = data.bias(lin, start, stop)
        outs.append(y if b is None else y + b)
    return np.concatenate(outs, axis=1)


def _merge_ranges(ranges):
    out = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _unsharded_weights(data: AttentionData, reader: str):
    spec = data.spec
    full = {}
    for part, n in (("q", spec.heads), ("k", spec.kv_heads), ("v", spec.kv_heads)):
        lin = data.linears.get(part) or data.linears["qkv"]
        arrays = data.arrays[lin.prefix]
        w = simulate.dequantize(take(arrays, lin, "out", 0, lin.out_features), lin, reader)
        rows = np.concatenate([np.arange(a, b) for a, b in _row_ranges(spec, part, 0, n)])
        full[part] = (w[rows], None if data.bias(lin) is None else data.bias(lin)[rows])
    o = data.linears["o"]
    wo = simulate.dequantize(take(data.arrays[o.prefix], o, "in", 0, o.in_features), o, reader)
    return full, wo


def attention_reference(data: AttentionData, x: np.ndarray, reader: str, positions: np.ndarray | None = None) -> np.ndarray:
    """The unsharded block (whole linears dequantized), HF repeat_kv mapping."""
    full, wo = _unsharded_weights(data, reader)
    biases = {p: b for p, (_, b) in full.items()}
    biases["o"] = data.bias(data.linears["o"])
    return attention_from_weights(full["q"][0], full["k"][0], full["v"][0], wo, x, data.spec, biases, data.norms, positions)


def rank_heads(spec: AttentionSpec, t: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) rank `rank` owns at TP t, as vLLM's QKVParallelLinear assigns them."""
    h, kv = spec.heads, spec.kv_heads
    if h % t:
        raise ShardError(f"{h} attention heads do not split over {t} ranks", kind="split")
    if kv >= t:
        if kv % t:
            raise ShardError(f"{kv} KV heads do not split over {t} ranks", kind="split")
        kv_r = kv // t
        kvs = range(rank * kv_r, (rank + 1) * kv_r)
    else:
        if t % kv:
            raise ShardError(f"TP {t} is not a multiple of {kv} KV heads (no replication)", kind="split")
        kvs = range(rank // (t // kv), rank // (t // kv) + 1)
    h_r = h // t
    return range(rank * h_r, (rank + 1) * h_r), kvs


def attention_sharded(data: AttentionData, x: np.ndarray, t: int, reader: str,
                      positions: np.ndarray | None = None) -> np.ndarray:
    """The block on t simulated ranks (vLLM sharding), o_proj partial outputs summed."""
    spec, o = data.spec, data.linears["o"]
    d = spec.head_dim
    s = x.shape[0]
    positions = np.arange(s) if positions is None else positions
    y = np.zeros((s, o.out_features))
    for rank in range(t):
        try:
            qs, kvs = rank_heads(spec, t, rank)
            q = _project(data, "q", qs.start, len(qs), x, reader).reshape(s, len(qs), d)
            k = _project(data, "k", kvs.start, len(kvs), x, reader).reshape(s, len(kvs), d)
            v = _project(data, "v", kvs.start, len(kvs), x, reader).reshape(s, len(kvs), d)
            o_part = take(data.arrays[o.prefix], o, "in", qs.start * d, qs.stop * d)
        except ShardError as exc:
            exc.rank = rank
            exc.message = f"rank {rank}: {exc.message}"
            exc.args = (exc.message,)
            raise
        q, k = _norm_rope(q, k, positions, spec, data.norms)
        local_kv = np.arange(len(qs)) // (len(qs) // len(kvs))  # vLLM: local head j -> local KV head j // (h_r/kv_r)
        ctx = _heads_context(q, k, v, local_kv, spec)
        wo = simulate.dequantize(o_part, replace(o, in_features=len(qs) * d), reader)
        y += ctx @ wo.T
    bo = data.bias(o)
    return y if bo is None else y + bo


def shard_problems(ckpt: Checkpoint, t: int) -> list[ShardError]:
    """Every rank's attention shard at TP t checked from shapes alone (no data): heads / KV heads split,
    q/k/v row ranges are whole packed words, o_proj input ranges are whole words and whole scale groups."""
    spec = spec_for(ckpt)
    problems: list[ShardError] = []
    layers: dict[int, dict[str, Linear]] = {}
    for lin in ckpt.linears:
        if lin.block == "attn" and lin.layer is not None:
            layers.setdefault(lin.layer, {})[lin.role] = lin
    for rank in range(t):
        try:
            qs, kvs = rank_heads(spec, t, rank)
        except ShardError as exc:
            return [exc]
        for roles in layers.values():
            spans = []
            for part, heads_ in (("q", qs), ("k", kvs), ("v", kvs)):
                lin = roles.get(part) or roles.get("qkv")
                if lin is not None:
                    spans += [(lin, "out", a, b) for a, b in _merge_ranges(_row_ranges(spec, part, heads_.start, len(heads_)))]
            if "o" in roles:
                spans.append((roles["o"], "in", qs.start * spec.head_dim, qs.stop * spec.head_dim))
            for lin, dim, a, b in spans:
                problem = simulate.slice_problem(lin, dim, a, b)
                if problem is not None:
                    problems.append(ShardError(f"rank {rank}: {problem[1]}", kind=problem[0], rank=rank, prefix=lin.prefix))
    return problems


def readers(data: AttentionData) -> tuple[str, ...]:
    return formats.readers_of(data.linears.values())


# --- comparison -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionResult:
    layer: int
    reader: str
    tp: int  # 0 = padded output run unsharded
    error: float  # max relative error vs the unpadded source run unsharded (inf: could not run)
    detail: str = ""


@dataclass(frozen=True)
class AttentionCheck:
    results: tuple[AttentionResult, ...]
    tolerance: float

    @property
    def max_error(self) -> float:
        return max((r.error for r in self.results), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.results) and self.max_error <= self.tolerance

    @property
    def failures(self) -> tuple[AttentionResult, ...]:
        return tuple(r for r in self.results if not r.error <= self.tolerance)


def compare_attention(src: Checkpoint, out: Checkpoint, tps=(), layers=None, seq: int = 8, seed: int = 0,
                      tolerance: float = REL_TOL) -> AttentionCheck:
    """Unpadded `src` (unsharded, the truth) vs padded `out`, unsharded and at every t in `tps`, per layer
    and reader. A rank that cannot be formed (ShardError: heads / KV heads do not split, a straddled group)
    gives error inf with the reason in `detail`."""
    chosen = attention_layers(src) if layers is None else tuple(layers)
    rng = np.random.default_rng(seed)
    hidden = src.dims.hidden or next(lin.in_features for lin in src.linears if lin.block == "attn" and lin.role != "o")
    x = rng.standard_normal((seq, hidden))
    results = []
    for layer in chosen:
        s_data, o_data = load_attention(src, layer), load_attention(out, layer)
        for reader in readers(s_data):
            ref = attention_reference(s_data, x, reader)
            results.append(AttentionResult(layer, reader, 0, relative_error(attention_reference(o_data, x, reader), ref)))
            for t in tps:
                try:
                    y = attention_sharded(o_data, x, t, reader)
                    results.append(AttentionResult(layer, reader, t, relative_error(y, ref)))
                except ShardError as exc:
                    results.append(AttentionResult(layer, reader, t, math.inf, exc.message))
    return AttentionCheck(tuple(results), tolerance)

