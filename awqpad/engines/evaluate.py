"""Evaluate engine rules (profiles.py) against a checkpoint's dimensions at a TP size, also for a
hypothetical attention-head count (what head padding asks before choosing one).

A rule applies to a linear when its format is one of the rule's formats (rules.Rule.covers), so an AWQ
checkpoint never hears a compressed-tensors message and vice versa."""

from __future__ import annotations

import math
from dataclasses import dataclass

from awqpad.checkpoint.model import Checkpoint
from awqpad.engines import fp8_rules
from awqpad.engines.fp8_rules import rules_for, runs_at
from awqpad.engines.profiles import Rule

MLP_KINDS = ("dense", "shared", "expert")
KIND_LABEL = {"dense": "MLP", "shared": "shared expert", "expert": "MoE expert"}
HEAD_QUANTITIES = ("heads", "kv_heads", "attn.K_r", "attn.N_r")
# Rules that only attention-head padding (--pad-heads) can fix.
HEAD_RULES = ("heads", "kv_heads", "attn-o-groups", "attn-qkv-marlin-n")


@dataclass(frozen=True)
class Violation:
    engine: str
    tp: int
    rule: str
    quantity: str
    value: float | int
    multiple: int
    severity: str  # error | fallback
    paddable: bool  # awqpad can fix it by padding an MLP width
    message: str  # what the engine prints
    explanation: str  # what failed, in awqpad's words
    source: str
    path: str | None = None  # the kernel path the rule guards (rules.Rule.path)
    fallback_to: str | None = None  # severity "fallback": the slower kernel the engine takes instead

    @property
    def outcome(self) -> str:
        return "refused" if self.severity == "error" else "fallback"


def group_sizes(rule: Rule) -> tuple[int, ...]:
    """The group sizes a "group" rule accepts: "128" or "one-of(-1,32,64,128)"."""
    spec = rule.multiple
    if spec.startswith("one-of("):
        return tuple(int(x) for x in spec[len("one-of(") : -1].split(","))
    return (int(spec),)


def multiple_of(rule: Rule, t: int, group: int | None, bits: int | None, block_n: int | None = None) -> int:
    g = group if group and group > 0 else 1
    spec = rule.multiple
    if spec == "block_n":
        return block_n or 1
    if spec == "block_k":
        return g
    if spec == "t":
        return t
    if spec == "group":
        return g
    if spec == "pack":
        return 32 // (bits or 4)
    if spec.startswith("lcm(group,"):
        return math.lcm(g, int(spec[len("lcm(group,") : -1]))
    if spec.startswith("max(64,"):
        return max(64, g)
    return int(spec)


@dataclass(frozen=True)
class Subject:
    """What a rule's quantity refers to in this checkpoint."""

    kind: str | None  # MLP kind for paddable quantities
    quantized: bool
    group: int | None
    bits: int | None
    format: str | None = None
    block_n: int | None = None  # FP8 block scales: outputs per scale row


def mlp_subject(ckpt: Checkpoint, kind: str, part: str) -> Subject | None:
    blocks = [b for b in ckpt.mlps if b.kind == kind]
    if not blocks:
        return None
    lin = blocks[0].linears[-1] if part == "K_r" else blocks[0].linears[0]
    return Subject(kind, lin.quantized, lin.group_size, lin.bits, lin.format, lin.block_n)


def attn_subject(ckpt: Checkpoint, part: str) -> Subject | None:
    roles = ("o",) if part == "K_r" else ("q", "qkv")
    lin = next((lin for lin in ckpt.linears if lin.role in roles), None)
    if lin is None:
        return None
    return Subject(None, lin.quantized, lin.group_size, lin.bits, lin.format)


def constraint(rule: Rule, t: int, subject: Subject) -> tuple[int, int]:
    """(c, M): a paddable width W satisfies the rule iff c * W % M == 0."""
    m = multiple_of(rule, t, subject.group, subject.bits, subject.block_n)
    part = rule.quantity.split(".")[1]
    if part == "W":
        return 1, m
    if part in ("K_r", "P_r"):  # P_r: each column partition of gate_up, W / t
        return 1, t * m
    return 2, t * m  # N_r of merged gate_up = 2W / t


def applies(rule: Rule, subject: Subject) -> bool:
    return (rule.quantized is None or rule.quantized == subject.quantized) and rule.covers(subject.format)


def evaluate(ckpt: Checkpoint, engine: str, t: int, widths: dict[str, int] | None = None,
             expert_parallel: bool = False) -> list[Violation]:
    """Every rule of `engine` that fails at TP t (with MLP widths overridden by `widths`). Under expert
    parallelism the experts are spread whole over the ranks, so expert rules hold at TP 1."""
    dims = ckpt.dims
    widths = widths or {}
    out: list[Violation] = []
    alternatives: dict[str, list[Violation | None]] = {}

    def fail(rule, value, m, paddable, explanation, split=None):
        text = rule.message.format(value=value, t=t if split is None else split, m=m)
        return Violation(engine, t, rule.id, rule.quantity, value, m, rule.severity, paddable, text, explanation, rule.source,
                         rule.path, rule.fallback_to)

    for rule in rules_for(engine, ckpt):
        result: Violation | None = None
        q = rule.quantity
        if q.startswith("linear."):
            found = fp8_rules.linear_violations(ckpt, rule, t, 1) if runs_at(rule, t) else None
            if found is not None:
                result = fail(rule, found[0], found[1], False, found[2])
        elif q == "block":  # FP8 weight_block_size (fp8_rules.py)
            found = fp8_rules.block_violation(ckpt, rule)
            if found is not None:
                result = fail(rule, found[0], found[1], False, found[2])
        elif q == "format":  # the engine has no loader for this format at all (nvfp4_rules.UNLOADABLE)
            result = fail(rule, ckpt.format, "-", False, f"{engine} has no loader for {ckpt.format} checkpoints at any TP")
        elif q == "heads":
            if dims.heads and dims.heads % t:
                result = fail(rule, dims.heads, t, False, f"{dims.heads} attention heads do not split over {t} GPUs")
        elif q == "kv_heads":
            kv = dims.kv_heads
            if kv and not ckpt.family.mla:
                ok = (kv % t == 0 or t % kv == 0) if rule.multiple == "kv-replicate" else kv % t == 0
                if not ok:
                    result = fail(rule, kv, t, False, f"{kv} KV heads neither divide nor are divided by TP {t}")
        elif q == "hidden":
            subject = mlp_subject(ckpt, "expert", "K_r")
            if subject is not None and applies(rule, subject) and subject.quantized and dims.hidden:
                m = multiple_of(rule, t, subject.group, subject.bits)
                if dims.hidden % m:
                    result = fail(rule, dims.hidden, m, False, f"hidden_size {dims.hidden} is not a multiple of {m}")
        elif q == "group":
            g = ckpt.group_size
            lin = next((lin for lin in ckpt.linears if lin.quantized), None)
            accepted = group_sizes(rule)
            if lin is not None and applies(rule, Subject(None, True, g, lin.bits, lin.format)) and g is not None \
                    and g not in accepted:
                shown = accepted[0] if len(accepted) == 1 else list(accepted)
                result = fail(rule, g, shown, False, f"group size {g} is not {' or '.join(map(str, accepted))}")
        elif q.startswith("attn."):
            part = q.split(".")[1]
            subject = attn_subject(ckpt, part)
            if subject is not None and applies(rule, subject) and dims.heads and dims.heads % t == 0:
                m = multiple_of(rule, t, subject.group, subject.bits)
                o = next((lin for lin in ckpt.linears if lin.role == "o"), None)
                if part == "K_r" and o is not None:
                    value = o.in_features / t
                else:
                    kv = dims.kv_heads or dims.heads
                    value = (dims.heads // t + 2 * max(1, kv // t)) * (dims.head_dim or 0)
                if value != int(value) or int(value) % m:
                    what = "o_proj input" if part == "K_r" else "merged qkv output"
                    result = fail(rule, _num(value), m, False,
                                  f"per-rank {what} {_num(value)} is not a multiple of {m} (needs attention-head padding)")
        else:
            kind, part = q.split(".")
            subject = mlp_subject(ckpt, kind, part)
            split = 1 if kind == "expert" and expert_parallel else t  # the TP this MLP is split over
            if subject is not None and applies(rule, subject) and runs_at(rule, split):
                width = widths.get(kind, ckpt.dims.widths[kind][-1])
                c, big_m = constraint(rule, split, subject)
                if (c * width) % big_m:
                    m = multiple_of(rule, split, subject.group, subject.bits, subject.block_n)
                    value = {"W": width, "K_r": width / split, "N_r": 2 * width / split, "P_r": width / split}[part]
                    label = {"W": "width", "K_r": "down_proj input per rank", "N_r": "gate_up output per rank",
                             "P_r": "gate / up output per rank"}[part]
                    result = fail(rule, _num(value), m, True,
                                  f"{KIND_LABEL[kind]} {label} {_num(value)} is not a multiple of {m}", split)
        if rule.any_of:
            alternatives.setdefault(rule.any_of, []).append(result)
        elif result is not None:
            out.append(result)
    for options in alternatives.values():
        if all(v is not None for v in options):
            out.extend(options)
    return out


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)


# --- attention rules with a hypothetical head count ----------------------------------------------


def engine_names(engines) -> tuple[str, ...]:
    """One engine profile name or an iterable of them, as a tuple."""
    return (engines,) if isinstance(engines, str) else tuple(engines)


def attention_violations(ckpt: Checkpoint, engine: str, t: int, heads: int | None = None,
                         kv_heads: int | None = None, head_dim: int | None = None) -> list[Violation]:
    """The attention rules of `engine` (quantities heads, kv_heads, attn.K_r, attn.N_r) at TP t, evaluated
    for a hypothetical (heads, kv_heads, head_dim); None = the checkpoint's own. Mirrors evaluate."""
    dims = ckpt.dims
    heads = dims.heads if heads is None else heads
    kv = (dims.kv_heads if kv_heads is None else kv_heads) or heads
    d = dims.head_dim if head_dim is None else head_dim
    out = []

    def fail(rule, value, m, explanation):
        text = rule.message.format(value=value, t=t, m=m)
        return Violation(engine, t, rule.id, rule.quantity, value, m, rule.severity, False, text, explanation, rule.source,
                         rule.path, rule.fallback_to)

    for rule in rules_for(engine, ckpt):
        q = rule.quantity
        if q not in HEAD_QUANTITIES or rule.any_of:
            continue
        if q == "heads":
            if heads and heads % t:
                out.append(fail(rule, heads, t, f"{heads} attention heads do not split over {t} GPUs"))
        elif q == "kv_heads":
            if kv and not ckpt.family.mla:
                ok = (kv % t == 0 or t % kv == 0) if rule.multiple == "kv-replicate" else kv % t == 0
                if not ok:
                    out.append(fail(rule, kv, t, f"{kv} KV heads neither divide nor are divided by TP {t}"))
        else:
            part = q.split(".")[1]
            subject = attn_subject(ckpt, part)
            if subject is None or not applies(rule, subject) or not heads or heads % t:
                continue
            m = multiple_of(rule, t, subject.group, subject.bits)
            if part == "K_r":
                value = heads * (d or 0) / t
            else:
                value = (heads // t + 2 * max(1, kv // t)) * (d or 0)
            if value != int(value) or int(value) % m:
                what = "o_proj input" if part == "K_r" else "merged qkv output"
                out.append(fail(rule, _num(value), m, f"per-rank {what} {_num(value)} is not a multiple of {m} "
                                                      "(needs attention-head padding)"))
    return out


def evaluate_with_heads(ckpt: Checkpoint, engine: str, t: int, widths: dict[str, int] | None = None,
                        heads: int | None = None, kv_heads: int | None = None,
                        expert_parallel: bool = False) -> list[Violation]:
    """evaluate with MLP widths AND head counts overridden: what `plan`/`verify` should use after
    head padding (the checkpoint's attention quantities are replaced by the hypothetical ones)."""
    base = [v for v in evaluate(ckpt, engine, t, widths, expert_parallel) if v.quantity not in HEAD_QUANTITIES]
    return base + attention_violations(ckpt, engine, t, heads, kv_heads)


def head_violations(ckpt: Checkpoint, tps, engines) -> list[Violation]:
    """Every attention-rule error of the unpadded checkpoint at the requested TPs."""
    return [v for e in engine_names(engines) for t in tps for v in attention_violations(ckpt, e, t) if v.severity == "error"]


def attention_ok(ckpt: Checkpoint, tps, engines, heads: int, kv_heads: int) -> bool:
    """True if (heads, kv_heads) passes every attention rule of every engine at every TP (what head padding
    may choose, and what verify asks of a padded output)."""
    tps = tuple(tps)
    return not any(v.severity == "error" for e in engine_names(engines) for t in tps
                   for v in attention_violations(ckpt, e, t, heads, kv_heads))
