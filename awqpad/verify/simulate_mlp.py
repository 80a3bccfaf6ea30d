"""Tensor parallelism simulated in float64: shard the packed tensors the way vLLM does, run every rank, all-reduce.

A gated MLP y = down(act(gate x) * up x) runs on t ranks as vLLM runs it:

* gate and up are column-parallel: rank r owns outputs [r*W/t, (r+1)*W/t) of each. vLLM merges them
  (MergedColumnParallelLinear, FusedMoE w13): the rank's merged parameter is [gate_r; up_r], built
  here by concatenating the packed shards (qweight words, qzeros words, scale columns, ...).
  A fused gate_up tensor (Phi-3, ChatGLM) is split into its gate and up halves first.
* down is row-parallel: rank r owns inputs [r*W/t, (r+1)*W/t) with the scale / zero-point rows of
  exactly those inputs, rows [r*K_r/g, (r+1)*K_r/g). If K_r is not whole groups, a rank's inputs
  would share a scale row with its neighbour: that is the partial group engines refuse, and
  `take` raises ShardError naming the rank. With act-order (GPTQ desc_act, compressed-tensors
  actorder=group) and with per-channel scales, vLLM replicates scales / zero points on every
  rank and shards only g_idx (marlin_utils.marlin_repeat_scales_on_all_ranks); so does `take`.
* The partial outputs of down are summed (the all-reduce) and down's bias is added once.

Each rank dequantizes only its own shard with the format's own dequantizer (formats/*.dequantize),
so a wrong scale row, a shifted word or a mis-sharded g_idx changes the result. Everything is
float64; the padded model differs from the source only by summation order (~1e-16 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from awqpad.checkpoint import formats
from awqpad.checkpoint.model import Linear, MLPBlock
from awqpad.checkpoint.formats.base import to_float64
from awqpad.verify.shard_slice import ShardError, dequantize, merge, scales_partitioned, slice_problem, take, units

ACTIVATIONS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
}
ACT_ALIASES = {"silu": "silu", "swish": "silu", "swiglu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
REFERENCE_CHUNK_BYTES = 64 << 20  # float64 bytes of one dequantized chunk in the chunked reference


def activation_name(config_text: dict) -> str:
    raw = config_text.get("hidden_act") or config_text.get("hidden_activation") or "silu"
    return ACT_ALIASES.get(str(raw).lower(), "silu")


def engine_reader(block: MLPBlock) -> str:
    """The reader vLLM uses for a block: GPTQ sym -> gptq_marlin (qzeros ignored), GPTQ asym -> gptq
    (zeros + 1 in v1, as stored in v2); every other format has one reader."""
    lin = next((lin for lin in block.linears if lin.quantized), block.linears[0])
    names = formats.BY_NAME[lin.format].readers(lin)
    if lin.format == "gptq":
        return "marlin-sym" if "marlin-sym" in names else ("v2" if lin.gptq_v2 else "v1-unmasked")
    return names[0]


def readers(block: MLPBlock) -> tuple[str, ...]:
    """Reader variants to run a block under: the union over its linears (each falls back to its own first)."""
    return formats.readers_of(block.linears)


# --- the MLP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPData:
    """One MLP block and its tensors: {linear prefix: {part: numpy array}}."""

    block: MLPBlock
    arrays: dict

    def role(self, role: str) -> Linear | None:
        return next((lin for lin in self.block.linears if lin.role == role), None)

    def gate_up(self) -> tuple[tuple[Linear, int], tuple[Linear, int]]:
        fused = self.role("gate_up")
        if fused is not None:
            return (fused, 0), (fused, self.block.width)
        return (self.role("gate"), 0), (self.role("up"), 0)

    def bias(self, linear: Linear, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        raw = self.arrays[linear.prefix].get("bias")
        if raw is None:
            return None
        return to_float64(raw, linear.parts["bias"].dtype)[start:stop]


def split(width: int, t: int, label: str = "MLP") -> list[tuple[int, int]]:
    """Each rank's [start, stop) of an MLP width; ShardError if it does not divide (vLLM's divide() assert)."""
    if width % t:
        raise ShardError(f"{label} width {width} does not split over {t} ranks ({width} % {t} = {width % t})", kind="split")
    step = width // t
    return [(r * step, (r + 1) * step) for r in range(t)]


def _gated(hg: np.ndarray, hu: np.ndarray, act: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return ACTIVATIONS[act](hg) * hu


def _chunk(n: int, hidden: int, linears, chunk_bytes: int) -> int:
    """Features of the MLP width per pass so that three float64 slices stay under chunk_bytes
    (whole words and whole groups; all of n when it fits)."""
    if 3 * n * hidden * 8 <= chunk_bytes:
        return max(n, 1)
    unit = math.lcm(8, *(lin.group_size if lin.group_size and lin.group_size > 0 else 1 for lin in linears))
    return max(unit, chunk_bytes // (3 * hidden * 8) // unit * unit)


def _accumulate(y: np.ndarray, x: np.ndarray, gate, up, down, ranges, biases, reader: str, act: str,
                chunk_bytes: int) -> None:
    """y += down(act(gate x + bg) * (up x + bu)) over the MLP features `ranges` ([(start, stop)]).

    gate / up: (arrays, linear, offset of feature 0 along its outputs); down: (arrays, linear) over its
    inputs. biases: (bg, bu) over all features or None. Features go in bounded chunks."""
    (g_arr, g_lin, g_off), (u_arr, u_lin, u_off), (d_arr, d_lin) = gate, up, down
    bg, bu = biases
    hidden = max(g_lin.in_features, d_lin.out_features)
    with np.errstate(all="ignore"):
        for start, stop in ranges:
            step = _chunk(stop - start, hidden, (g_lin, u_lin, d_lin), chunk_bytes)
            for c0 in range(start, stop, step):
                c1 = min(stop, c0 + step)
                hg = _apply(dequantize(take(g_arr, g_lin, "out", g_off + c0, g_off + c1), g_lin, reader), x)
                hu = _apply(dequantize(take(u_arr, u_lin, "out", u_off + c0, u_off + c1), u_lin, reader), x)
                if bg is not None:
                    hg = hg + bg[c0:c1]
                if bu is not None:
                    hu = hu + bu[c0:c1]
                y += _apply(dequantize(take(d_arr, d_lin, "in", c0, c1), d_lin, reader), _gated(hg, hu, act))


def _apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ w.T for a batch x [B, in] and weights w [out, in], as (w @ x.T).T: with a tiny batch the
    weight-on-the-left form keeps OpenBLAS on its fast path (x @ w.T can be ~10x slower when threaded)."""
    return (w @ x.T).T


def _clip(channels, lo: int, hi: int) -> list[tuple[int, int]]:
    """`channels` ([(start, stop)] in block coordinates) within [lo, hi), shifted to start at lo."""
    out = []
    for a, b in channels:
        a, b = max(a, lo), min(b, hi)
        if a < b:
            out.append((a - lo, b - lo))
    return out


def mlp_reference(data: MLPData, x: np.ndarray, reader: str, act: str = "silu",
                  chunk_bytes: int = REFERENCE_CHUNK_BYTES, channels=None) -> np.ndarray:
    """The unsharded MLP in float64: gate, up and down each read whole (in chunks of whole groups of
    the width when the dequantized weights would exceed chunk_bytes: the same sum, bounded memory).

    `channels` ([(start, stop)], whole groups): only those MLP features contribute (a partial sum over
    the width, compared with mlp_sharded over the same channels); features past the width are ignored.
    """
    (g_lin, g_off), (u_lin, u_off) = data.gate_up()
    d_lin = data.role("down")
    w = data.block.width
    y = np.zeros((x.shape[0], d_lin.out_features))
    ranges = [(0, w)] if channels is None else _clip(channels, 0, w)
    biases = (data.bias(g_lin, g_off, g_off + w), data.bias(u_lin, u_off, u_off + w))
    _accumulate(y, x, (data.arrays[g_lin.prefix], g_lin, g_off), (data.arrays[u_lin.prefix], u_lin, u_off),
                (data.arrays[d_lin.prefix], d_lin), ranges, biases, reader, act, chunk_bytes)
    bd = data.bias(d_lin)
    return y if bd is None else y + bd


def mlp_sharded(data: MLPData, x: np.ndarray, t: int, reader: str, act: str = "silu",
                notes: list[str] | None = None, chunk_bytes: int = REFERENCE_CHUNK_BYTES, channels=None) -> np.ndarray:
    """The MLP on t simulated ranks, partial outputs summed as the all-reduce sums them.

    Each rank's packed shard is formed first (take + merge: what the engine's loader builds); the
    rank then runs on it (on the part of `channels` it owns, if given). Raises ShardError (with
    .rank) for the first rank whose shard the engine could not form. If gate and up store different
    g_idx (vLLM's merged parameter holds only one), each is dequantized with its own and a note is
    appended to `notes`: a property of the checkpoint, not of the sharding (real GPTQ checkpoints share
    one act-order for both).
    """
    (g_lin, g_off), (u_lin, u_off) = data.gate_up()
    d_lin = data.role("down")
    y = np.zeros((x.shape[0], d_lin.out_features))
    for rank, (start, stop) in enumerate(split(data.block.width, t, data.block.label)):
        n_r = stop - start
        ranges = [(0, n_r)] if channels is None else _clip(channels, start, stop)
        try:
            if g_lin.format != u_lin.format:
                raise ShardError(f"{data.block.label}: gate is {g_lin.format} but up is {u_lin.format}; "
                                 "vLLM merges them into one parameter", kind="split")
            g_part = take(data.arrays[g_lin.prefix], g_lin, "out", g_off + start, g_off + stop)
            u_part = take(data.arrays[u_lin.prefix], u_lin, "out", u_off + start, u_off + stop)
            d_part = take(data.arrays[d_lin.prefix], d_lin, "in", start, stop)
            if not ranges:
                continue
            try:
                merged = merge([g_part, u_part], g_lin)
                m_lin = replace(g_lin, out_features=2 * n_r)
                gate, up = (merged, m_lin, 0), (merged, m_lin, n_r)
            except ShardError as exc:
                if notes is not None and exc.message not in notes:
                    notes.append(exc.message)
                gate = (g_part, replace(g_lin, out_features=n_r), 0)
                up = (u_part, replace(u_lin, out_features=n_r), 0)
        except ShardError as exc:
            exc.rank = rank
            exc.message = f"rank {rank}: {exc.message}"
            exc.args = (exc.message,)
            raise
        biases = (data.bias(g_lin, g_off + start, g_off + stop), data.bias(u_lin, u_off + start, u_off + stop))
        _accumulate(y, x, gate, up, (d_part, replace(d_lin, in_features=n_r)), ranges, biases, reader, act, chunk_bytes)
    bd = data.bias(d_lin)
    return y if bd is None else y + bd


def block_unit(block: MLPBlock) -> int:
    """Smallest feature count every shard boundary of `block` must be a multiple of: packed words of
    gate/up outputs and down inputs, and down's group when its scale rows are split by rank."""
    unit = 1
    for lin in block.linears:
        unit = math.lcm(unit, units(lin, "in" if lin.role == "down" else "out"))
        if lin.role == "down" and scales_partitioned(lin):
            unit = math.lcm(unit, lin.group_size)
    return unit


def sample_channels(block: MLPBlock, t: int, original_width: int | None = None, seed: int = 0,
                    span: int = 128) -> list[tuple[int, int]]:
    """A sample of the MLP width, in whole shard units, where sharding can go wrong: the first and
    last `span` features of three ranks (the first, the last and one chosen by `seed`), plus the padded
    tail [original_width, width) and the span before it. Requires width % t == 0 and each rank's share
    to be whole units (what shard_problems checks)."""
    width = block.width
    n_r = width // t
    unit = block_unit(block)
    span = min(n_r, unit * max(1, -(-span // unit)))
    rng = np.random.default_rng(seed)
    ranks = {0, t - 1}
    if t > 2:
        ranks.add(int(rng.integers(1, t - 1)))
    picks = []
    for r in sorted(ranks):
        a, b = r * n_r, (r + 1) * n_r
        picks += [(a, a + span), (b - span, b)]
    if original_width is not None and original_width < width:
        picks.append((max(0, original_width // unit * unit - span), width))
    merged: list[list[int]] = []
    for a, b in sorted(picks):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def shard_problems(block: MLPBlock, t: int) -> list[ShardError]:
    """Every rank's shard of every linear of `block` at TP t, checked from shapes alone (no data)."""
    try:
        ranges = split(block.width, t, block.label)
    except ShardError as exc:
        return [exc]
    fused = next((lin for lin in block.linears if lin.role == "gate_up"), None)
    problems = []
    for rank, (start, stop) in enumerate(ranges):
        for lin in block.linears:
            if lin.role == "down":
                spans = [("in", start, stop)]
            elif lin is fused:
                spans = [("out", start, stop), ("out", block.width + start, block.width + stop)]
            else:
                spans = [("out", start, stop)]
            for dim, a, b in spans:
                problem = slice_problem(lin, dim, a, b)
                if problem is not None:
                    problems.append(ShardError(f"rank {rank}: {problem[1]}", kind=problem[0], rank=rank, prefix=lin.prefix))
                    break
    return problems


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| over finite outputs (absolute when the reference is all zero).

    Non-finite reference outputs (NaN / inf weights in the source) must be reproduced exactly at the
    same positions, else the error is inf.
    """
    fy, fr = np.isfinite(y), np.isfinite(ref)
    if not np.array_equal(fy, fr) or not np.array_equal(y[~fr], ref[~fr], equal_nan=True):
        return math.inf
    if not fr.any():
        return 0.0
    diff = float(np.max(np.abs(y[fr] - ref[fr])))
    scale = float(np.max(np.abs(ref[fr])))
    return diff / scale if scale > 0 else diff
