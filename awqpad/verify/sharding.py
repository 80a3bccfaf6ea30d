"""Per TP size: each engine's rules hold on OUT, and every rank's shard of every MLP linear can be formed."""

from __future__ import annotations

from awqpad.engines.evaluate import evaluate
from awqpad.serialize import to_data
from awqpad.verify import simulate_mlp as simulate
from awqpad.verify.context import Check, VerifyContext, make_check, not_compared


def check_rules(ctx: VerifyContext, t: int) -> list[Check]:
    """The engines' per-rank rules (engines.evaluate, as `plan` uses them) at TP t, one Check per engine."""
    return [_engine_rules(ctx, engine, t) for engine in ctx.engines]


def _engine_rules(ctx: VerifyContext, engine: str, t: int) -> Check:
    out = ctx.out
    found = {}
    variants = [None] + [{kind: w} for kind, ws in out.dims.widths.items() if len(ws) > 1 for w in ws]
    for widths in variants:
        for v in evaluate(out, engine, t, widths, ctx.expert_parallel):
            found.setdefault((v.rule, str(v.value)), v)
    errors = [v for v in found.values() if v.severity == "error"]
    slower = [v for v in found.values() if v.severity != "error"]
    problems = [f"{v.explanation} [{v.rule}] — {engine}: {v.message}" for v in errors]
    note = f"; {len(slower)} fallback warning(s): {slower[0].explanation}" if slower else ""
    return make_check(f"rules {engine} TP={t}", problems, f"every {engine} rule holds at TP {t}{note}",
                      {"engine": engine, "tp": t, "violations": to_data(list(found.values()))})


def check_shards(ctx: VerifyContext, t: int) -> list[Check]:
    """Every rank's shard of every MLP linear is whole packed words and whole groups at TP t."""
    problems = []
    for block in ctx.out.mlps:
        problems += [f"{block.label}: {p.message}" for p in simulate.shard_problems(block, ctx.split(block, t))]
    linears = sum(len(b.linears) for b in ctx.out.mlps)
    if not linears:  # a check that compared nothing must not pass
        problems.append(not_compared(f"OUT has no MLP blocks that awqpad recognizes ({len(ctx.out.linears)} linears), "
                                     f"so no rank's shard was formed"))
    return [make_check(f"shards TP={t}", problems,
                       f"all {t} ranks get whole words and whole groups of all {linears} MLP linears",
                       {"tp": t, "blocks": len(ctx.out.mlps), "linears": linears})]
