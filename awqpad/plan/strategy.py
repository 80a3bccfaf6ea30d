"""`--strategy pad|regroup|auto`: which exact transformation makes the checkpoint load, and what it costs.

Candidates, for every requested TP and engine at once:
  none           leave it as it is (only if nothing is refused; may leave a layer on a fallback kernel)
  pad            zero-pad MLP widths in whole groups (plan/pad_plan.py)
  regroup gN     split every group into smaller ones of N (plan/regroup.py), N in g/2, g/4 (>= 32)
  regroup gN + pad  both: regroup, then pad what still does not split
  regroup BxB    block-FP8: blocks [bn, bk] refined to [bn/r, bk/r], scales repeated (same ranking); engines whose
                 fast kernels take only 128 x 128 blocks leave it on a fallback (vLLM: Triton) or refuse it
Ranking: refused last; then fewest layers left on a fallback kernel (fast kernel first); then the lowest
cost = added bytes (share of the checkpoint) + added matmul FLOPs (share of the weights they multiply);
then the simplest. Whether an engine takes the smaller group is its own rule rows (engines/*.py, quantity
"group"), so a profile whose kernels refuse group 64 rejects that candidate and says why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from awqpad.checkpoint.model import Checkpoint
from awqpad.errors import InputError
from awqpad.plan import regroup
from awqpad.plan.pad_plan import Blocker, PadPlan, make_plan

STRATEGIES = ("auto", "pad", "regroup")
DEFAULT_STRATEGY = "auto"


@dataclass(frozen=True)
class Candidate:
    name: str
    group_size: int | None
    widths: dict[str, int]  # MLP kind -> padded width (changed ones only)
    added_bytes: int
    added_percent: float  # of the checkpoint's bytes
    added_flops_percent: float  # of the matmul work of the widest-padded MLP kind (as plan's added_flops_percent)
    cost: float  # what ranks it: added bytes + added FLOPs, both as a share of the checkpoint's weights
    fallbacks: int  # (engine, TP, rule) left on a slower kernel
    refused: bool
    chosen: bool = False
    rejected: str | None = None  # why not, in one line


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return strategy


def _cost(plan: PadPlan, extra_bytes: int) -> tuple[int, float, float, float]:
    """(added bytes, their % of the checkpoint, % FLOPs of the padded kind, ranking cost). Padding adds
    FLOPs in proportion to the weights it adds; regrouping adds only scale/zero bytes (the dequantize
    step reads one more scale per 64 weights: not counted)."""
    total = plan.total_bytes or 1
    added = plan.added_bytes + extra_bytes
    flops_share = sum(d.added_fraction * d.original_bytes for d in plan.changed_dims) / total
    kind_flops = max((d.added_fraction for d in plan.changed_dims), default=0.0)
    return added, 100 * added / total, 100 * kind_flops, 100 * (added / total + flops_share)


def _fallbacks(violations) -> list:
    return list({(v.engine, v.tp, v.rule): v for v in violations if v.severity == "fallback"}.values())


def _candidate(name, group, plan: PadPlan, extra_bytes: int, violations=None, changed=True) -> Candidate:
    added, pct, flops, cost = _cost(plan, extra_bytes) if changed else (0, 0.0, 0.0, 0.0)
    after = plan.violations_after if violations is None else violations
    refused = plan.blocked if violations is None else any(v.severity == "error" for v in violations)
    widths = {d.kind: d.padded for d in plan.changed_dims} if changed else {}
    return Candidate(name, group, widths, added, round(pct, 3), round(flops, 3), round(cost, 4), len(_fallbacks(after)), refused)


def _key(c: Candidate) -> tuple:
    return (c.refused, c.fallbacks, c.cost, c.name.count("+"), c.name)


def _why_not(c: Candidate, best: Candidate, plans: dict) -> str:
    if c.refused:
        plan = plans.get(c.name)
        first = plan.blockers[0] if plan is not None and plan.blockers else None
        if first is not None:
            return f"still refused by {first.engine} at TP {first.tp}: {first.explanation or first.message}"
        return "still refused by the engine (see 'Before')"
    if c.fallbacks > best.fallbacks:
        return f"leaves {c.fallbacks} layer kind(s) on a slower fallback kernel"
    return (f"costs more: +{c.added_percent:.2f} % bytes, +{c.added_flops_percent:.2f} % FLOPs "
            f"(chosen: +{best.added_percent:.2f} %, +{best.added_flops_percent:.2f} %)")


# Refined FP8 blocks dequantize bit-identically, but W8A8 kernels quantize activations per [1, block_k]
# group, so finer blocks change the activation rounding: the served function is not exactly the same.
# auto only picks exact plans; --strategy regroup asks for it knowingly (and the plan says so in a note).
AUTO_NO_REFINE = ("refining FP8 blocks also makes W8A8 kernels quantize activations in finer groups, so outputs "
                  "are not bit-identical; auto only picks exact plans (ask for it with --strategy regroup)")


def plan_with_strategy(ckpt: Checkpoint, tps: tuple[int, ...], engine: str = "vllm", skip_experts: bool = False,
                       pad_heads: bool = False, expert_parallel: bool = False, strategy: str = DEFAULT_STRATEGY) -> PadPlan:
    """make_plan, with regrouping candidates weighed against padding (see the module docstring)."""
    check_strategy(strategy)
    base = make_plan(ckpt, tps, engine, skip_experts, pad_heads, expert_parallel)
    plans: dict[str, PadPlan] = {}
    extras: dict[str, tuple[int, list, regroup.RegroupChange | None]] = {}
    cands: list[Candidate] = []

    before_refused = any(v.severity == "error" for v in base.violations_before)
    if base.needs_padding and not before_refused:
        none = _candidate("none", ckpt.group_size, base, 0, base.violations_before, changed=False)
        cands.append(none)
    pad_name = "pad" if base.needs_padding else "none"
    if strategy != "regroup" or not base.needs_padding:
        plans[pad_name] = base
        cands.append(_candidate(pad_name, ckpt.group_size, base, 0, changed=base.needs_padding))
    else:
        cands.append(dataclasses.replace(_candidate("pad", ckpt.group_size, base, 0), rejected="not allowed by --strategy regroup"))

    for r in regroup.FACTORS if strategy != "pad" else ():
        g = ckpt.group_size or 0
        label = regroup.label(ckpt, r)
        why = regroup.refusal(ckpt, r)
        if why:
            cands.append(Candidate(label, None, {}, 0, 0.0, 0.0, 0.0, 0, True, rejected=why))
            continue
        virtual = regroup.regrouped(ckpt, r)
        plan = make_plan(virtual, tps, engine, skip_experts, pad_heads, expert_parallel)
        rops = regroup.ops(ckpt, r)
        name = label + (" + pad" if plan.changed_dims else "")
        cand = _candidate(name, g // r, plan, regroup.added_bytes(rops))
        if strategy == "regroup" and plan.changed_dims:
            cand = dataclasses.replace(cand, rejected="regrouping alone does not split every width: it needs padding too")
        elif strategy == "auto" and regroup.is_fp8_blocks(ckpt) and not cand.refused:  # engine refusals say more
            cand = dataclasses.replace(cand, rejected=AUTO_NO_REFINE)
        plans[name] = plan
        extras[name] = (r, rops, regroup.change(ckpt, r, rops))
        cands.append(cand)

    allowed = [c for c in cands if c.rejected is None and (c.name in plans or c.name == "none")]
    best = min(allowed, key=_key) if allowed else None
    if best is not None and best.refused:  # nothing loads: show the padding plan and its blockers, not a refused regroup
        best = next((c for c in allowed if c.name == pad_name and c.name in plans), best)
    rows = []
    for c in sorted(cands, key=lambda c: (c is not best, c.rejected is not None, _key(c))):
        if c is best:
            rows.append(dataclasses.replace(c, chosen=True))
        else:
            rows.append(c if c.rejected else dataclasses.replace(c, rejected=_why_not(c, best, plans)))
    if best is None or best.name == "none" and "none" not in plans:
        # "none" wins only when it leaves nothing refused: then write nothing
        chosen = base if best is None else _unchanged(base)
        blockers = list(chosen.blockers)
        if strategy == "regroup" and best is None:
            blockers.append(Blocker(engine, max(tps), "regroup-alone", rows[0].rejected or "regrouping is not possible",
                                    "no regrouping makes every requested TP load on its own; --strategy auto can also pad", ()))
        return dataclasses.replace(chosen, strategy=strategy, candidates=tuple(rows), blockers=tuple(blockers))
    chosen = plans[best.name]
    if best.name not in extras:
        return dataclasses.replace(chosen, strategy=strategy, candidates=tuple(rows))
    r, rops, change = extras[best.name]
    config = {**chosen.config_updates, change.config_key: regroup.quant_config(ckpt, r)}
    refine = (_refine_note(change),) if change.block is not None else ()
    notes, warnings = chosen.notes + refine, tuple(chosen.warnings) + refine  # pad says it too, not only plan
    return dataclasses.replace(
        chosen, ops=tuple(regroup.merge(rops, list(chosen.ops))), config_updates=config,
        added_bytes=chosen.added_bytes + change.added_bytes, group_size=ckpt.group_size,
        violations_before=base.violations_before, strategy=strategy, regroup=change, candidates=tuple(rows), notes=notes,
        warnings=warnings)


def _refine_note(change: regroup.RegroupChange) -> str:
    (bn, bk), (nbn, nbk) = change.block, change.new_block
    return (f"FP8 blocks refined [{bn}, {bk}] -> [{nbn}, {nbk}]: every weight byte is unchanged and each new block "
            f"repeats its parent's scale, so the weights dequantize bit-identically; W8A8 engines quantize activations "
            f"per [1, {nbk}] instead of [1, {bk}] inputs (finer, not identical rounding)")


def _unchanged(base: PadPlan) -> PadPlan:
    """The pad plan with nothing written (strategy "none": load as it is, on the fallback kernel)."""
    dims = tuple(dataclasses.replace(d, padded=d.original, added_bytes=0) for d in base.dims)
    return dataclasses.replace(base, ops=(), dims=dims, config_updates={}, added_bytes=0,
                               violations_after=base.violations_before)
