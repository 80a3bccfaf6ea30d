"""Attention-head padding: zero query heads (and, where needed, zero KV groups) so heads split over TP.

A query head whose q_proj rows (and q bias) are 0 scores 0 against every key, so it attends uniformly
and its context is the running mean of V: NOT zero. What makes the padding exact is that the o_proj
input columns of that head are 0 too. Under grouped-query attention (GQA) query head i reads KV head
i // (heads / kv_heads) (HF `repeat_kv`, vLLM's per-rank layout), so the zero heads must keep every
real head in its group:

* insert-in-groups: (r' - r) zero query heads at the END OF EACH KV GROUP (r = heads / kv_heads);
  kv_heads and the KV cache are unchanged. Appending them after the last group would shift every
  later head into another group: wrong (attention_sim demonstrates it).
* new-kv-groups: whole zero KV groups appended (zero k/v heads + r' zero query heads each). Needed when
  the KV head count itself is the blocker (e.g. TGI without KV replication, or 10 KV heads at TP 16).
  It grows the KV cache by (kv' - kv) / kv.
* append: MHA (every head its own group: zero q/k/v heads appended) and MQA (one group: zero query
  heads appended to it).

Layouts (architecture.py): separate q/k/v/o; fused [q; k; v] (Phi-3 qkv_proj, ChatGLM
query_key_value, Baichuan W_pack); InternLM2 wqkv grouped per KV head [(q_1..q_r, k, v) per group].
q/k/v biases pad 0; Qwen3 q_norm / k_norm are per head_dim and stay. o_proj inputs are inserted at
head boundaries, so a quantized o_proj needs head_dim % group_size == 0 (whole groups per head).

config.json gets the new num_attention_heads (and KV head count), plus an explicit head_dim: after
padding, hidden_size / num_attention_heads no longer gives it. Not every engine reads head_dim for
every architecture: engines/head_dim.py records, per architecture and engine, the first release read
that does (each entry names the file it was read in).

Refused (UnsupportedError): ALiBi (slopes depend on the head count), MLA, unknown architectures,
attention parameters with a head axis awqpad does not know (e.g. gpt-oss sinks), q/k norms over the
whole projection, quantized o_proj whose groups straddle heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from awqpad.checkpoint.formats.base import TensorOp
from awqpad.checkpoint.header import tensor_nbytes
from awqpad.checkpoint.model import Checkpoint, Linear
from awqpad.engines.evaluate import attention_ok, engine_names, head_violations
from awqpad.engines.head_dim import (ENGINE_LABEL, HEAD_DIM_IGNORED, QWEN2_VLLM_WORKAROUND, HeadDimSupport,
                                     engine_support, engines_ignoring_head_dim, runtime_support, support_key)
from awqpad.errors import UnsupportedError
from awqpad.plan.head_layout import attention_linears, head_config_updates, head_map, head_ops, strategy_name

MAX_GROWTH = 4  # never propose more than MAX_GROWTH x the query heads
NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadBlocker:
    """Head padding cannot make the requested TP work (same fields as plan.Blocker)."""

    engine: str
    tp: int
    rule: str
    message: str
    explanation: str
    nearest_tp: tuple[int, ...] = ()


@dataclass(frozen=True)
class HeadPlan:
    family: str
    architecture: str
    strategy: str  # none | insert-in-groups | new-kv-groups | insert-in-groups+new-kv-groups | append
    heads: int
    new_heads: int
    kv_heads: int
    new_kv_heads: int
    head_dim: int
    layers: int  # attention layers padded
    reasons: tuple[str, ...]  # rule ids that forced it
    config_updates: dict[str, int]  # dotted config path -> new value
    ops: tuple[TensorOp, ...] = field(repr=False)
    added_bytes: int = 0
    attention_bytes: int = 0  # bytes of the attention linears before padding
    proj_flops_increase: float = 0.0  # q/k/v/o projection FLOPs, fraction
    core_flops_increase: float = 0.0  # QK^T and PV FLOPs (scale with query heads), fraction
    kv_cache_increase: float = 0.0  # fraction
    engine_support: tuple[HeadDimSupport, ...] = ()  # every runtime read (engines.head_dim row)
    unsupported_engines: tuple[str, ...] = ()  # selected engines that ignore head_dim for this architecture
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.new_heads, self.new_kv_heads) != (self.heads, self.kv_heads)

    @property
    def head_map(self) -> tuple[int, ...]:
        """New index of every original query head."""
        return head_map(self.heads, self.kv_heads, self.new_heads, self.new_kv_heads)

    @property
    def zero_heads(self) -> tuple[int, ...]:
        kept = set(self.head_map)
        return tuple(i for i in range(self.new_heads) if i not in kept)

    @property
    def caveats(self) -> tuple[str, ...]:
        """Minimum engine versions that read config head_dim for this architecture (one line each)."""
        return tuple(s.text for s in self.engine_support)

    @property
    def summary(self) -> str:
        if not self.changed:
            return f"attention heads {self.heads} (KV {self.kv_heads}) need no padding"
        r, r2 = self.heads // self.kv_heads, self.new_heads // self.new_kv_heads
        how = {
            "insert-in-groups": f"{r2 - r} zero query head(s) at the end of each of the {self.kv_heads} KV groups",
            "new-kv-groups": f"{self.new_kv_heads - self.kv_heads} zero KV group(s) of {r2} query heads appended",
            "insert-in-groups+new-kv-groups": f"{r2 - r} zero query head(s) at the end of each KV group and "
                                              f"{self.new_kv_heads - self.kv_heads} zero KV group(s) appended",
            "append": f"{self.new_heads - self.heads} zero head(s) appended"
                      + (" (with zero K/V heads: MHA)" if self.kv_heads == self.heads and self.heads > 1 else ""),
        }[self.strategy]
        kv = (f"KV heads {self.kv_heads} -> {self.new_kv_heads}, KV cache +{100 * self.kv_cache_increase:.1f} %"
              if self.new_kv_heads != self.kv_heads else "KV cache unchanged")
        return (f"attention heads {self.heads} -> {self.new_heads} ({how}); +{100 * self.proj_flops_increase:.1f} % "
                f"attention projection FLOPs, +{100 * self.core_flops_increase:.1f} % attention score/context FLOPs; {kv}")


# --- refusals ---------------------------------------------------------------------------------


def _alibi_reason(ckpt: Checkpoint) -> str | None:
    cfg, mt = ckpt.config.text, ckpt.config.model_type
    attn_cfg = cfg.get("attn_config") if isinstance(cfg.get("attn_config"), dict) else {}
    if cfg.get("alibi") or cfg.get("use_alibi") or attn_cfg.get("alibi") or cfg.get("position_embedding_type") == "alibi":
        return "config.json enables ALiBi"
    if mt in ("bloom", "mpt"):
        return f"model_type {mt} uses ALiBi"
    if ckpt.family.name == "baichuan" and ckpt.config.architecture != "BaiChuanForCausalLM" and cfg.get("hidden_size") != 4096:
        return "Baichuan 13B models use ALiBi (vLLM baichuan.py: hidden_size != 4096 -> ALIBI)"
    return None


def check_paddable(ckpt: Checkpoint) -> None:
    """Raise UnsupportedError (one line) if head padding of this checkpoint would not be exact / is unknown."""
    fam = ckpt.family
    if fam.mla:
        raise UnsupportedError(f"{ckpt.config.architecture}: multi-head latent attention (MLA) heads cannot be padded")
    if not ckpt.family_known:
        raise UnsupportedError(
            f"unknown architecture {ckpt.config.architecture or ckpt.config.model_type!r}: awqpad pads attention heads "
            "only for architectures whose attention it knows (per-head parameters, RoPE, head_dim handling)")
    reason = _alibi_reason(ckpt)
    if reason:
        raise UnsupportedError(f"{reason}: ALiBi slopes depend on the number of heads, so added heads change every head")
    dims = ckpt.dims
    h, kv, d = dims.heads, dims.kv_heads, dims.head_dim
    if not h or not kv or not d:
        raise UnsupportedError("the attention head count, KV head count or head_dim is missing from config.json")
    if h % kv:
        raise UnsupportedError(f"{h} attention heads are not a multiple of {kv} KV heads")
    layers = attention_linears(ckpt)
    if not layers:
        raise UnsupportedError("no attention projections recognised: nothing to pad")
    for layer, roles in layers.items():
        if "o" not in roles or not ({"q", "k", "v"} <= roles.keys() or "qkv" in roles) or "mla" in roles:
            raise UnsupportedError(f"layer {layer}: attention projections {sorted(roles)} are not q/k/v/o or fused qkv/o")
        o = roles["o"]
        want_qkv = (h + 2 * kv) * d
        sizes = ({"q": roles["q"].out_features, "k": roles["k"].out_features, "v": roles["v"].out_features}
                 if "q" in roles else {"qkv": roles["qkv"].out_features})
        expect = {"q": h * d, "k": kv * d, "v": kv * d, "qkv": want_qkv}
        bad = {r: n for r, n in sizes.items() if n != expect[r]}
        if bad or o.in_features != h * d:
            raise UnsupportedError(
                f"layer {layer}: projection sizes {bad or {'o.in': o.in_features}} do not match {h} heads x "
                f"{kv} KV heads x head_dim {d} from config.json")
        for lin in roles.values():
            if lin.quantized and lin.group_size == -1 and lin.role == "o":
                raise UnsupportedError(f"{lin.prefix}: per-channel quantized o_proj cannot take zero input rows "
                                       "(its one scale group cannot be 0)")
        if o.quantized and o.group_size and o.group_size > 0 and d % o.group_size:
            raise UnsupportedError(
                f"{o.prefix}: head_dim {d} is not a multiple of the quantization group size {o.group_size}, so a "
                "zero head's o_proj input rows would share a scale group with a real head; head padding needs "
                "head_dim % group_size == 0 for a quantized o_proj")
    _check_attention_tensors(ckpt, layers, d)


def _check_attention_tensors(ckpt: Checkpoint, layers: dict[int, dict[str, Linear]], d: int) -> None:
    modules = {roles["o"].prefix.rpartition(".")[0] for roles in layers.values()}
    linear_prefixes = {lin.prefix for roles in layers.values() for lin in roles.values()}
    for name, info in ckpt.tensors.items():
        prefix = name.rpartition(".")[0]
        if prefix in linear_prefixes:
            continue
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if owner is None:
            continue
        leaf = name[len(owner) + 1:]
        if leaf.endswith("inv_freq"):
            continue
        if leaf.split(".")[0] in NORM_NAMES:
            if tuple(info.shape) != (d,):
                raise UnsupportedError(
                    f"{name} has shape {list(info.shape)}: a q/k norm over more than one head mixes heads, so zero "
                    "heads would change it (only per-head_dim norms, as in Qwen3, are exact)")
            continue
        raise UnsupportedError(
            f"{name} {list(info.shape)}: attention parameter awqpad does not know how to pad for new heads "
            "(per-head parameters such as attention sinks are not handled)")


# --- choosing the head count ------------------------------------------------------------------


def choose_heads(ckpt: Checkpoint, tps, engines) -> tuple[int, int] | None:
    """Smallest (heads', kv_heads') with heads' = kv' * r', kv' >= kv, r' >= r that passes every attention rule
    of every engine at every TP; ties go to the fewest KV heads (no KV-cache growth). None: none up to MAX_GROWTH x."""
    h, kv = ckpt.dims.heads, ckpt.dims.kv_heads
    r = h // kv
    engines = engine_names(engines)
    for h2 in range(h, MAX_GROWTH * h + 1):
        for k2 in range(kv, h2 // r + 1):
            if h2 % k2 == 0 and attention_ok(ckpt, tps, engines, h2, k2):
                return h2, k2
    return None


def _op_bytes(op: TensorOp) -> int:
    return tensor_nbytes(op.dtype, op.new_shape) - tensor_nbytes(op.dtype, op.old_shape)


# --- the planner ------------------------------------------------------------------------------


def plan_heads(ckpt: Checkpoint, tps, engines, *, allow_ignored_head_dim: bool = False) -> HeadPlan | HeadBlocker:
    """The smallest exact attention-head padding that makes every selected engine's attention rules hold at
    every TP in `tps`.

    Returns a HeadPlan (strategy "none" and no ops when the heads already split), or a HeadBlocker when no
    head count up to MAX_GROWTH x works, or when a selected engine ignores config head_dim for this
    architecture in every release read (unless allow_ignored_head_dim: then the plan lists it in
    `unsupported_engines`). Raises UnsupportedError when head padding would not be exact (ALiBi, MLA,
    unknown per-head parameters, quantized o_proj with head_dim % group_size != 0, ...).
    """
    engines = engine_names(engines)
    tps = tuple(sorted(set(tps)))
    dims = ckpt.dims
    h, kv, d = dims.heads, dims.kv_heads, dims.head_dim
    before = head_violations(ckpt, tps, engines)
    support = engine_support(ckpt)  # every runtime read, for plan / verify / the model card
    if not before:
        return HeadPlan(ckpt.family.name, ckpt.config.architecture, "none", h or 0, h or 0, kv or 0, kv or 0, d or 0,
                        0, (), {}, (), engine_support=support)
    check_paddable(ckpt)
    chosen = choose_heads(ckpt, tps, engines)
    worst = max(before, key=lambda v: v.tp)
    if chosen is None:
        return HeadBlocker(worst.engine, worst.tp, worst.rule,
                           f"no head count up to {MAX_GROWTH} x {h} satisfies the attention rules at TP {list(tps)}",
                           worst.explanation)
    h2, k2 = chosen
    ignoring = engines_ignoring_head_dim(support, engines)
    if ignoring and not allow_ignored_head_dim:
        s = runtime_support(support, ignoring[0])
        others = [x.text for x in support if x.status == "yes"]
        hint = f"; {QWEN2_VLLM_WORKAROUND}" if support_key(ckpt) == "qwen2" and s.engine == "vllm" else ""
        return HeadBlocker(
            ",".join(ignoring), worst.tp, HEAD_DIM_IGNORED,
            f"{ENGINE_LABEL.get(s.engine, s.engine)} ignores config head_dim for {ckpt.config.architecture} "
            f"({s.source}; read {s.checked}), so {h} -> {h2} padded heads would not load",
            "head_dim is read by: " + ("; ".join(others) if others else "no engine read") + hint)
    layers = attention_linears(ckpt)
    ops = head_ops(ckpt, h2, k2)
    attn_bytes = sum(lin.nbytes for roles in layers.values() for lin in roles.values())
    notes = []
    if ignoring:
        notes.append(f"{', '.join(ignoring)}: ignores config head_dim for this architecture; the padded model will not load there")
        if support_key(ckpt) == "qwen2" and "vllm" in {runtime_support(support, e).engine for e in ignoring}:
            notes.append(QWEN2_VLLM_WORKAROUND)
    if k2 != kv:
        notes.append(f"KV heads {kv} -> {k2}: the KV cache grows by {100 * (k2 - kv) / kv:.1f} %")
    return HeadPlan(
        family=ckpt.family.name,
        architecture=ckpt.config.architecture,
        strategy=strategy_name(h, kv, h2, k2),
        heads=h, new_heads=h2, kv_heads=kv, new_kv_heads=k2, head_dim=d,
        layers=len(layers),
        reasons=tuple(sorted({v.rule for v in before})),
        config_updates=head_config_updates(ckpt, h2, k2),
        ops=ops,
        added_bytes=sum(map(_op_bytes, ops)),
        attention_bytes=attn_bytes,
        proj_flops_increase=((2 * h2 + 2 * k2) - (2 * h + 2 * kv)) / (2 * h + 2 * kv),
        core_flops_increase=(h2 - h) / h,
        kv_cache_increase=(k2 - kv) / kv,
        engine_support=support,
        unsupported_engines=ignoring,
        notes=tuple(notes),
    )


def caveat_markdown(plan: HeadPlan) -> str:
    """Model-card / README paragraph: which engine versions read config head_dim for this architecture."""
    lines = [f"Attention heads were padded {plan.heads} -> {plan.new_heads} (KV heads {plan.kv_heads} -> "
             f"{plan.new_kv_heads}); `head_dim` = {plan.head_dim} is now written explicitly because "
             "hidden_size / num_attention_heads no longer gives it. Engines that derive head_dim from hidden_size "
             "cannot load this checkpoint. Minimum versions that read `head_dim` for "
             f"{plan.architecture}:", ""]
    lines += [f"- {s.text}" for s in plan.engine_support]
    return "\n".join(lines) + "\n"


padded_heads_ok = attention_ok  # (ckpt, tps, engines, heads, kv_heads): does a padded head count pass?

__all__ = [
    "HeadPlan", "HeadBlocker", "plan_heads", "choose_heads", "check_paddable", "caveat_markdown", "padded_heads_ok",
    "attention_linears", "head_map", "head_ops", "strategy_name",
]
