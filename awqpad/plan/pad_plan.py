"""Pure planning: checkpoint + TP sizes + engine rules -> a serializable pad plan.

For every paddable MLP width (dense intermediate, expert, shared expert) the plan picks the
smallest width >= the original that satisfies every selected engine's rule at every requested TP,
and turns it into per-tensor operations (formats/*.pad_ops). Whatever padding cannot fix (heads,
KV heads, attention projections, unsupported layouts) becomes a blocker.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from awqpad.checkpoint import formats
from awqpad.checkpoint.model import Checkpoint, MLPBlock
from awqpad.checkpoint.config import check_supported_quant
from awqpad.checkpoint.foreign import refuse
from awqpad.checkpoint.formats import fp8_config
from awqpad.plan import fp8_cost
from awqpad.engines.fp8_rules import is_fp8, notes_for, rules_for, runs_at
from awqpad.engines.profiles import ENGINE_NOTES, engines_for
from awqpad.errors import UnsupportedError
from awqpad.checkpoint.formats.base import Fill, LogicalInsert, TensorOp, make_op
from awqpad.plan.regroup import RegroupChange
from awqpad.plan.heads import HeadBlocker, HeadPlan, plan_heads
from awqpad.engines.evaluate import (HEAD_RULES, KIND_LABEL, MLP_KINDS, Violation, applies, constraint, evaluate,
                                     evaluate_with_heads, mlp_subject)

SCHEMA_VERSION = 1
MOE_COST_WARNING = 0.10
TP_CANDIDATES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class DimChange:
    kind: str  # dense | expert | shared
    config_key: str | None  # e.g. intermediate_size (None: derived, e.g. DeepSeek shared experts)
    original: int
    padded: int
    modules: int  # MLP blocks affected
    added_bytes: int
    original_bytes: int  # bytes of the affected MLP tensors before padding
    reason: tuple[str, ...]  # rule ids that forced it

    @property
    def added_fraction(self) -> float:
        return (self.padded - self.original) / self.original if self.original else 0.0


@dataclass(frozen=True)
class Blocker:
    engine: str  # rule "unsupported-layout": the input itself is unsupported (exit 2, see errors.UnsupportedError)
    tp: int
    rule: str
    message: str
    explanation: str
    nearest_tp: tuple[int, ...]  # closest TP sizes (below / above) where this rule holds


@dataclass(frozen=True)
class PadPlan:
    schema_version: int
    source_id: str
    revision: str | None
    tp: tuple[int, ...]
    engine: str
    engines: tuple[str, ...]
    format: str
    bits: int | None
    group_size: int | None
    skip_experts: bool
    dims: tuple[DimChange, ...]
    config_updates: dict[str, int]  # dotted config path -> new value
    ops: tuple[TensorOp, ...] = field(repr=False)
    violations_before: tuple[Violation, ...]
    violations_after: tuple[Violation, ...]
    blockers: tuple[Blocker, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    added_bytes: int
    total_bytes: int
    pad_heads: bool = False
    heads: "HeadPlan | None" = None  # attention-head padding (--pad-heads), when it changes anything
    expert_parallel: bool = False  # experts spread whole over the ranks (not TP-split)
    strategy: str = "pad"  # pad | regroup | auto (plan/strategy.py)
    regroup: "RegroupChange | None" = None  # groups split into smaller ones (plan/regroup.py)
    candidates: tuple = ()  # strategy.Candidate rows considered, the chosen one first

    @property
    def unsupported(self) -> "Blocker | None":
        """The blocker that is a property of the input, not of the TP size: pad and plan exit 2 for it."""
        return next((b for b in self.blockers if b.rule == "unsupported-layout"), None)

    @property
    def needs_padding(self) -> bool:
        """The checkpoint must be rewritten (padded and/or regrouped)."""
        return bool(self.ops)

    @property
    def changed_dims(self) -> tuple[DimChange, ...]:
        return tuple(d for d in self.dims if d.padded != d.original)

    @property
    def blocked(self) -> bool:
        return bool(self.blockers)


def _width(ckpt: Checkpoint, kind: str) -> int:
    return ckpt.dims.widths[kind][-1]


def _constraints(ckpt: Checkpoint, kind: str, engines, tps) -> tuple[list[tuple[int, int, str]], dict]:
    """Conjunctive (c, M, rule) constraints on width W of `kind`, plus OR-groups of alternatives."""
    fixed, groups = [], {}
    for engine, t in itertools.product(engines, tps):
        for rule in rules_for(engine, ckpt):
            if not runs_at(rule, t) or "." not in rule.quantity or rule.quantity.split(".")[0] != kind:
                continue
            subject = mlp_subject(ckpt, kind, rule.quantity.split(".")[1])
            if subject is None or not applies(rule, subject):
                continue
            c, m = constraint(rule, t, subject)
            if rule.any_of:
                groups.setdefault((engine, t, rule.any_of), []).append((c, m, rule.id))
            else:
                fixed.append((c, m, rule.id))
    return fixed, groups


def _step(c: int, m: int) -> int:
    return m // math.gcd(c, m)


def _smallest_width(width: int, fixed, groups, format_step: int) -> tuple[int, tuple[str, ...]]:
    """Smallest W' >= width with c*W' % M == 0 for all fixed and one alternative per group."""
    best = None
    for choice in itertools.product(*groups.values()) if groups else [()]:
        cons = list(fixed) + list(choice)
        if all((c * width) % m == 0 for c, m, _ in cons):
            return width, ()
        step = math.lcm(format_step, *(_step(c, m) for c, m, _ in cons)) if cons else format_step
        candidate = -(-width // step) * step
        failing = tuple(sorted({rid for c, m, rid in cons if (c * width) % m}))
        if best is None or candidate < best[0]:
            best = (candidate, failing)
    return best


def _format_step(ckpt: Checkpoint, kind: str) -> int:
    """Padding granularity the tensors need: whole groups and whole packed words."""
    step = 1
    for block in ckpt.mlps:
        if block.kind != kind:
            continue
        for lin in block.linears:
            if lin.quantized:
                # whole groups / FP8 blocks (block_n on gate/up outputs, block_k on down inputs) and packed words
                step = math.lcm(step, 1 if lin.format == "fp8" else 8,
                                lin.group_size if lin.group_size and lin.group_size > 0 else 1, lin.block_n or 1)
        break
    return step


def block_ops(block: MLPBlock, new_width: int) -> list[TensorOp]:
    w, add = block.width, new_width - block.width
    ops = []
    for lin in block.linears:
        fmt = formats.BY_NAME[lin.format]
        if lin.role == "down":
            ops += fmt.pad_ops(lin, "in", (LogicalInsert(w, add),))
        elif lin.role == "gate_up":
            ops += fmt.pad_ops(lin, "out", (LogicalInsert(w, add), LogicalInsert(2 * w, add)))
        else:
            ops += fmt.pad_ops(lin, "out", (LogicalInsert(w, add),))
    if block.act_scales is not None:
        # AWQ ScaledActivation divides by these: pad with 1.0, never 0 (0/0 = NaN).
        ops.append(make_op(block.act_scales, 0, [(w, add)], Fill.const(1.0)))
    return ops


def _nearest_ok(ckpt: Checkpoint, engine: str, rule: str, t: int) -> tuple[int, ...]:
    """Closest TP sizes where nothing unpaddable fails (the blocking rule, or any other)."""
    ok = [
        c for c in TP_CANDIDATES
        if not any(not v.paddable and v.severity == "error" for v in evaluate(ckpt, engine, c))
    ]
    below = [c for c in ok if c < t]
    above = [c for c in ok if c > t]
    return tuple(([below[-1]] if below else []) + ([above[0]] if above else []))


def _op_bytes(op: TensorOp) -> int:
    from awqpad.checkpoint.header import tensor_nbytes

    return tensor_nbytes(op.dtype, op.new_shape) - tensor_nbytes(op.dtype, op.old_shape)


def _head_padding(ckpt: Checkpoint, tps, engines) -> HeadPlan | HeadBlocker | str:
    """What --pad-heads would do: a HeadPlan, a HeadBlocker, or the reason it cannot be done exactly."""
    try:
        return plan_heads(ckpt, tps, engines)
    except UnsupportedError as exc:
        return exc.message


def make_plan(ckpt: Checkpoint, tps: tuple[int, ...], engine: str = "vllm", skip_experts: bool = False,
              pad_heads: bool = False, expert_parallel: bool = False) -> PadPlan:
    """`expert_parallel`: the engine spreads whole experts over the ranks (vLLM --enable-expert-parallel,
    SGLang --ep-size), so expert widths are checked unsplit (TP 1) and padded only if that fails."""
    tps = tuple(sorted(set(tps)))
    engines = engines_for(engine)
    if ckpt.foreign is not None and not ckpt.foreign.engine_pads:
        refuse(ckpt.foreign)
    ep = expert_parallel
    before = [v for e in engines for t in tps for v in evaluate(ckpt, e, t, expert_parallel=ep)]
    blockers: list[Blocker] = []
    warnings: list[str] = []
    notes = [ENGINE_NOTES[e] for e in engines if e in ENGINE_NOTES and not is_fp8(ckpt)]
    notes += [n for e in engines for n in notes_for(e, ckpt) if n not in notes]
    if ckpt.foreign is not None:
        notes.append(ckpt.foreign.summary)
    try:
        check_supported_quant(ckpt.quant, ckpt.source.root / "config.json")
        unsupported = fp8_config.tensor_mismatch(ckpt)
    except UnsupportedError as exc:
        unsupported = exc.message

    widths: dict[str, int] = {}
    reasons: dict[str, tuple[str, ...]] = {}
    kinds = [k for k in MLP_KINDS if k in ckpt.dims.widths]
    tie_key = ckpt.family.shared_factor_key
    tie = int(ckpt.config.get(tie_key) or 0) if tie_key else 0
    tied = bool(tie) and "shared" in kinds and "expert" in kinds and _width(ckpt, "shared") == tie * _width(ckpt, "expert")
    for kind in kinds:
        if len(ckpt.dims.widths[kind]) > 1:
            blockers.append(Blocker(engine, max(tps), f"{kind}-widths", f"{KIND_LABEL[kind]} widths differ between layers {list(ckpt.dims.widths[kind])}; per-layer padding is not supported", "", ()))
            continue
        if tied and kind == "shared":
            continue
        if kind == "expert" and skip_experts:
            continue
        fixed, groups = _constraints(ckpt, kind, engines, (1,) if kind == "expert" and ep else tps)
        if tied and kind == "expert":
            s_fixed, s_groups = _constraints(ckpt, "shared", engines, tps)
            fixed += [(c * tie, m, rid) for c, m, rid in s_fixed]
            groups.update({k: [(c * tie, m, rid) for c, m, rid in alts] for k, alts in s_groups.items()})
        new, why = _smallest_width(_width(ckpt, kind), fixed, groups, _format_step(ckpt, kind))
        if new != _width(ckpt, kind):
            widths[kind], reasons[kind] = new, why
    if tied and "expert" in widths:
        widths["shared"], reasons["shared"] = tie * widths["expert"], reasons["expert"]

    ops: list[TensorOp] = []
    dims: list[DimChange] = []
    for kind in kinds:
        blocks = [b for b in ckpt.mlps if b.kind == kind]
        new = widths.get(kind, _width(ckpt, kind))
        kind_ops = []
        if kind in widths:
            try:
                kind_ops = [op for b in blocks for op in block_ops(b, new)]
            except UnsupportedError as exc:
                blockers.append(Blocker(engine, max(tps), f"{kind}-layout", exc.message, "padding is needed but cannot be done exactly", ()))
                new = _width(ckpt, kind)
        ops += kind_ops
        old_bytes = sum(lin.nbytes for b in blocks for lin in b.linears)
        key = ckpt.config_key(kind) if not (tied and kind == "shared") else None
        dims.append(DimChange(kind, key, _width(ckpt, kind), new, len(blocks), sum(map(_op_bytes, kind_ops)), old_bytes, reasons.get(kind, ())))

    heads_result = _head_padding(ckpt, tps, engines)
    head_plan = heads_result if pad_heads and isinstance(heads_result, HeadPlan) and heads_result.changed else None
    if pad_heads and isinstance(heads_result, HeadBlocker):
        b = heads_result
        blockers.append(Blocker(b.engine, b.tp, b.rule, b.message, b.explanation, b.nearest_tp))
    elif pad_heads and isinstance(heads_result, str):
        blockers.append(Blocker(engine, max(tps), "heads-unsupported", heads_result, heads_result, ()))
    if head_plan is not None:
        ops += head_plan.ops
        notes += list(head_plan.notes) + [f"head_dim support: {line}" for line in head_plan.caveats]
        after = [v for e in engines for t in tps
                 for v in evaluate_with_heads(ckpt, e, t, widths, head_plan.new_heads, head_plan.new_kv_heads, ep)]
    else:
        after = [v for e in engines for t in tps for v in evaluate(ckpt, e, t, widths, expert_parallel=ep)]
    if unsupported and (widths or any(v.paddable for v in before)):
        blockers.append(Blocker(engine, max(tps), "unsupported-layout", unsupported, unsupported, ()))
        ops, dims = [], [dataclasses.replace(d, padded=d.original, added_bytes=0) for d in dims]
    for v in after:
        if v.severity == "fallback":
            slower = f"the slower {v.fallback_to} kernel" if v.fallback_to else "a slower fallback kernel"
            warnings.append(f"{v.engine} TP={v.tp}: {v.explanation}; it loads through {slower}")
        elif not v.paddable or (v.quantity.startswith("expert.") and skip_experts):
            explanation = v.explanation
            if v.rule in HEAD_RULES and not pad_heads:
                if isinstance(heads_result, HeadPlan) and heads_result.changed:
                    explanation += f"; --pad-heads fixes it: {heads_result.summary}"
                elif isinstance(heads_result, HeadBlocker):
                    explanation += f"; --pad-heads cannot: {heads_result.message}"
                elif isinstance(heads_result, str):
                    explanation += f"; --pad-heads cannot: {heads_result}"
            blockers.append(Blocker(v.engine, v.tp, v.rule, v.message, explanation, _nearest_ok(ckpt, v.engine, v.rule, v.tp)))
    for change in dims:
        if change.kind == "expert" and change.added_fraction > MOE_COST_WARNING:
            warnings.append(
                f"padding MoE experts {change.original} -> {change.padded} adds {change.added_fraction:.0%} expert weights "
                "and expert FLOPs; alternatives: vLLM --enable-expert-parallel (experts are not split), a smaller TP, "
                "the engine's fallback MoE kernel (loads unpadded, slower), or --skip-experts"
            )

    if is_fp8(ckpt) and not ep and not blockers:
        warnings += fp8_cost.cost_lines(ckpt, dims, tps, engines[0], ckpt.source.source_id)

    config_updates = {}
    for change in dims:
        if change.config_key is None or change.padded == change.original:
            continue
        factor = ckpt.family.dense_key_factor if change.kind == "dense" else 1
        for path in _config_paths(ckpt, change.config_key):
            config_updates[path] = change.padded * factor
    if head_plan is not None:
        config_updates.update(head_plan.config_updates)
    return PadPlan(
        SCHEMA_VERSION,
        ckpt.source.source_id,
        ckpt.source.revision,
        tps,
        engine,
        engines,
        ckpt.format,
        ckpt.bits,
        ckpt.group_size,
        skip_experts,
        tuple(dims),
        config_updates,
        tuple(ops),
        tuple(before),
        tuple(after),
        tuple(_dedupe(blockers)),
        tuple(dict.fromkeys(warnings)),
        tuple(notes),
        sum(d.added_bytes for d in dims) + (head_plan.added_bytes if head_plan else 0),
        ckpt.total_bytes,
        pad_heads,
        head_plan,
        expert_parallel,
    )


def _config_paths(ckpt: Checkpoint, key: str) -> list[str]:
    """Every place config.json holds `key` for the language model (top level and nested text config)."""
    paths = []
    if ckpt.config.text_path and key in ckpt.config.text:
        paths.append(".".join(ckpt.config.text_path + (key,)))
    if key in ckpt.config.raw or not paths:
        paths.append(key)
    return paths


def _dedupe(blockers: list[Blocker]) -> list[Blocker]:
    seen, out = set(), []
    for b in blockers:
        key = (b.engine, b.tp, b.rule)
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out
