"""Function: OUT computes what SRC computes when sharded as the engine shards it.

  function TP=t   selected MLP blocks of OUT, sharded per rank, run in float64 and all-reduced, vs the
                  unpadded unsharded SRC block (simulate_mlp); blocks over SIM_BUDGET weights run on
                  a sample of whole groups of the width
  before TP=t     informational: what the unpadded SRC would do at TP t
  attention       head-padded models: per-rank attention shards, and the fp64 attention block vs SRC
                  (simulate_attention)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from awqpad.checkpoint.model import Checkpoint, MLPBlock
from awqpad.engines.evaluate import evaluate
from awqpad.errors import InputError
from awqpad.verify import simulate_mlp as simulate
from awqpad.verify.context import Check, VerifyContext, make_check, map_array, not_applicable, not_compared

REL_TOL = 1e-9
BATCH = 4  # random input vectors per simulated block
SIM_BUDGET = 1 << 25  # weights per simulated block (gate + up + down) before the width is sampled


def select_blocks(ckpt: Checkpoint, layers: str | tuple[int, ...], seed: int = 0) -> list[MLPBlock]:
    """MLP blocks to simulate: first, middle and last layer (all dense/shared blocks, a sample of
    experts: first, last and one chosen by `seed`); every block for 'all'; all blocks of listed layers."""
    if layers == "all":
        return list(ckpt.mlps)
    if layers == "none":
        return []
    present = sorted({b.layer for b in ckpt.mlps})
    if isinstance(layers, tuple):
        missing = sorted(set(layers) - set(present))
        if missing:
            raise InputError(f"--layers: layer(s) {missing} have no MLP in this checkpoint (layers {present[0]}..{present[-1]})"
                             if present else "--layers: this checkpoint has no MLP blocks")
        return [b for b in ckpt.mlps if b.layer in layers]
    if not present:
        return []
    chosen = sorted({present[0], present[len(present) // 2], present[-1]})
    rng = np.random.default_rng(seed)
    picked = []
    for layer in chosen:
        blocks = [b for b in ckpt.mlps if b.layer == layer]
        experts = sorted((b for b in blocks if b.kind == "expert"), key=lambda b: b.expert)
        keep = set()
        if experts:
            keep = {0, len(experts) - 1}
            if len(experts) > 2:
                keep.add(int(rng.integers(1, len(experts) - 1)))
        picked += [b for b in blocks if b.kind != "expert"] + [experts[i] for i in sorted(keep)]
    return picked


def check_function(ctx: VerifyContext) -> list[Check]:
    """function TP=t and the informational before TP=t for each TP size, from one pass over the blocks."""
    started = time.monotonic()
    src = ctx.src
    blocks = ctx.blocks
    by_key = {(b.kind, b.layer, b.expert): b for b in src.mlps}
    act = simulate.activation_name(src.config.text)
    per_t = {t: {"max_rel_error": 0.0, "worst": None, "problems": []} for t in ctx.tps}
    before = {t: {"problems": [], "max_rel_error": 0.0, "blocks": 0} for t in ctx.tps}
    readers_seen: set[str] = set()
    notes: list[str] = []
    nonfinite = outputs = 0
    sampled: list[float] = []
    total = sum(lin.nbytes for b in blocks for lin in b.linears)
    with ctx.progress(2 * total, "simulating TP") as advance:
        for n, block in enumerate(blocks):
            s_block = by_key.get((block.kind, block.layer, block.expert))
            if s_block is None:
                for t in ctx.tps:
                    per_t[t]["problems"].append(f"{block.label}: not in SRC")
                continue
            rng = np.random.default_rng([ctx.seed, n])
            x = rng.standard_normal((BATCH, s_block.linears[0].in_features))
            reader = simulate.engine_reader(s_block)
            readers_seen.add(reader)
            # Tensors are memory-mapped, one block at a time: SRC (reference, before), then OUT.
            s_data = _load(src.source.root, s_block)
            o_data = _load(ctx.root, block)
            for t in ctx.tps:
                _before_block(before[t], s_data, x, ctx.split(s_block, t), reader, act, ctx.seed)
            refs: dict = {}
            for t in ctx.tps:
                channels = None
                ranks = ctx.split(block, t)
                if 3 * block.width * hidden(block) > SIM_BUDGET and not simulate.shard_problems(block, ranks):
                    channels = simulate.sample_channels(block, ranks, s_block.width, seed=ctx.seed + n)
                    sampled.append(sum(b - a for a, b in channels) / block.width)
                key = tuple(channels or ())
                if key not in refs:
                    refs[key] = simulate.mlp_reference(s_data, x, reader, act, channels=channels)
                    nonfinite += int(np.size(refs[key]) - np.count_nonzero(np.isfinite(refs[key])))
                    outputs += int(np.size(refs[key]))
                ref = refs[key]
                try:
                    y = simulate.mlp_sharded(o_data, x, ranks, reader, act, notes, channels=channels)
                except simulate.ShardError as exc:
                    per_t[t]["problems"].append(f"{block.label}: {exc.message}")
                    continue
                err = simulate.relative_error(y, ref)
                if per_t[t]["worst"] is None or err > per_t[t]["max_rel_error"]:
                    per_t[t]["max_rel_error"] = err
                    per_t[t]["worst"] = block.label
                if not err <= REL_TOL:
                    per_t[t]["problems"].append(f"{block.label}: sharded OUT differs from SRC by {err:.3g} "
                                                f"(max relative error; reader {reader}; limit {REL_TOL:g})")
            del s_data, o_data, refs
            advance(sum(lin.nbytes for lin in s_block.linears) + sum(lin.nbytes for lin in block.linears))
    seconds = round(time.monotonic() - started, 3)
    if nonfinite and nonfinite < outputs:
        notes.append(f"SRC itself gives {nonfinite} of {outputs} outputs non-finite (NaN/inf weights); OUT "
                     "reproduces them at the same positions")
    if sampled:
        notes.append(f"blocks over {SIM_BUDGET / 1e6:.1f}M weights simulate a sample of whole groups: rank edges and "
                     f"the padded tail ({100 * min(sampled):.1f}-{100 * max(sampled):.1f}% of the width)")
    checks = []
    for t in ctx.tps:
        r = per_t[t]
        detail = (f"{len(blocks)} MLP blocks sharded over {t} ranks match SRC: max relative error "
                  f"{r['max_rel_error']:.2g} (limit {REL_TOL:g}; {seconds:.2f} s)")
        if outputs and nonfinite == outputs:  # a check that compared nothing must not pass
            r["problems"].append(f"not compared: all {outputs} outputs of the {len(blocks)} simulated MLP blocks are "
                                 "NaN/inf in SRC itself (its weights or scales hold NaN/inf), so no finite value "
                                 "could show that OUT computes what SRC computes")
        if notes:
            detail += f"; note: {notes[0]}" + (f" (+{len(notes) - 1} more)" if len(notes) > 1 else "")
        figures = {"tp": t, "blocks": len(blocks), "layers": sorted({b.layer for b in blocks}),
                   "readers": sorted(readers_seen), "max_rel_error": r["max_rel_error"],
                   "worst": r["worst"], "threshold": REL_TOL, "activation": act,
                   "nonfinite_outputs": nonfinite, "notes": notes, "sampled_blocks": len(sampled),
                   "seconds": seconds}
        if not blocks and ctx.layers == "none":
            checks.append(not_applicable(f"function TP={t}", "no MLP block simulated (--layers none: static checks only)",
                                         figures))
        else:
            if not blocks:
                r["problems"].append(not_compared(f"OUT has no MLP blocks that awqpad recognizes ({len(ctx.out.linears)} "
                                                  "linears), so no block was simulated"))
            checks.append(make_check(f"function TP={t}", r["problems"], detail, figures))
        checks.append(_before_check(ctx, t, before[t]))
    return checks


def _before_block(acc: dict, s_data: simulate.MLPData, x, t: int, reader: str, act: str, seed: int) -> None:
    """The unpadded SRC block at TP t: which rank's shard cannot be formed; else how it computes."""
    acc["blocks"] += 1
    block = s_data.block
    problems = simulate.shard_problems(block, t)
    if problems:
        acc["problems"].append((block, problems))
        return
    channels = None
    if 3 * block.width * hidden(block) > SIM_BUDGET:
        channels = simulate.sample_channels(block, t, seed=seed)
    try:
        y = simulate.mlp_sharded(s_data, x, t, reader, act, channels=channels)
    except simulate.ShardError as exc:
        acc["problems"].append((block, [exc]))
        return
    ref = simulate.mlp_reference(s_data, x, reader, act, channels=channels)
    acc["max_rel_error"] = max(acc["max_rel_error"], simulate.relative_error(y, ref))


def _before_check(ctx: VerifyContext, t: int, acc: dict) -> Check:
    src = ctx.src
    violations = [v for e in ctx.engines for v in evaluate(src, e, t, expert_parallel=ctx.expert_parallel)]
    errors = [v for v in violations if v.severity == "error"]
    # Shapes alone say which rank of which block cannot be formed: check every SRC block, not just
    # the simulated ones (so --layers none still tells the story).
    static = [(b, ps) for b in src.mlps for ps in [simulate.shard_problems(b, ctx.split(b, t))] if ps]
    found = static or acc["problems"]
    figures = {"tp": t, "informational": True, "blocks": len(src.mlps), "simulated_blocks": acc["blocks"],
               "blocks_with_problems": len(found),
               "engine_errors": [{"engine": v.engine, "rule": v.rule, "message": v.message} for v in errors]}
    if found:
        block, problems = found[0]
        first = problems[0]
        ranks = sorted({p.rank for p in problems if p.rank is not None})
        figures.update(first_rank=first.rank, partial_ranks=ranks, first_problem=first.message)
        where = first.message if first.message.startswith(block.label) else f"{block.label}: {first.message}"
        if ranks:
            where += f" ({len(ranks)} of {t} ranks affected)"
    elif errors:
        replicated = any(lin.desc_act for b in src.mlps for lin in b.linears)
        where = ("every rank's shard can be formed" + (" (act-order: every rank holds all scale rows)" if replicated else "")
                 + f", but the engine checks more: {errors[0].explanation}")
    else:
        figures["max_rel_error"] = acc["max_rel_error"]
        how = (f"max relative error {acc['max_rel_error']:.2g} over {acc['blocks']} simulated blocks" if acc["blocks"]
               else "from shapes; not simulated")
        return Check(f"before TP={t}", True, f"the unpadded SRC already shards cleanly at TP {t} ({how}); "
                     "padding was not needed for it", figures)
    engine_msg = f"; {errors[0].engine}: \"{errors[0].message}\"" if errors else ""
    return Check(f"before TP={t}", True, f"unpadded SRC at TP {t}: {where}{engine_msg}", figures)


def check_attention(ctx: VerifyContext) -> list[Check]:
    """Only when heads were padded: every rank's attention shard can be formed (shapes), and, with SRC,
    the fp64 attention block (RoPE, GQA mapping, causal softmax, q/k norms, biases), unsharded and
    sharded by heads, equals the unpadded SRC block."""
    from awqpad.verify import simulate_attention as attention_sim

    out, src = ctx.out, ctx.src
    padded = src is not None and (out.dims.heads, out.dims.kv_heads) != (src.dims.heads, src.dims.kv_heads)
    attn_ops = [op for op in (ctx.ops or ()) if op.tensor.split(".")[-2] in (
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "W_pack", "wqkv", "c_attn")]
    if not (padded or attn_ops):
        return []
    if not padded and all(op.regroup > 1 and not op.inserts and op.replace is None for op in attn_ops):
        # heads unchanged, attention linears only regrouped: no head shard changes; `regroup` proves the scales
        return [not_applicable("attention", f"heads were not padded; the {len(attn_ops)} attention tensors were only "
                               "regrouped (see regroup)", {"layers": []})]
    # no attention linears: the head counts alone would pass, having formed no rank's shard
    unformed = [] if attention_sim.attention_layers(out) else [not_compared(
        "OUT has no attention linears that awqpad recognizes, so no rank's q / k / v / o shard was formed")]
    checks = [make_check(f"attn-shards TP={t}", unformed + [p.message for p in attention_sim.shard_problems(out, t)],
                         f"all {t} ranks get whole heads ({out.dims.heads} query / {out.dims.kv_heads} KV) and whole groups")
              for t in ctx.tps]
    if src is None:
        return checks
    started = time.monotonic()
    all_layers = attention_sim.attention_layers(src)
    if ctx.layers == "all":
        chosen = all_layers
    elif ctx.layers == "none":
        chosen = ()
    elif isinstance(ctx.layers, tuple):
        chosen = tuple(layer for layer in ctx.layers if layer in all_layers)
    else:
        chosen = tuple(sorted({all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]})) if all_layers else ()
    if not chosen:  # a check that compared nothing must not pass, nor vanish from the report
        if ctx.layers == "none":
            checks.append(not_applicable("attention", "no attention layer simulated (--layers none: static checks only)",
                                         {"layers": []}))
        else:
            why = (f"--layers {','.join(map(str, ctx.layers))} selects no layer with attention (layers "
                   f"{', '.join(map(str, all_layers)) or 'none'} have it)" if isinstance(ctx.layers, tuple) and all_layers
                   else "SRC has no attention linears that awqpad recognizes")
            checks.append(make_check("attention", [not_compared(f"{why}, so the padded heads were not simulated")], "",
                                     {"layers": []}))
        return checks
    result = attention_sim.compare_attention(src, out, ctx.tps, layers=chosen, seed=ctx.seed)
    problems = [f"layer {r.layer} reader {r.reader} TP={r.tp or 1}: "
                + (r.detail or f"padded attention differs from SRC by {r.error:.3g} (limit {result.tolerance:g})")
                for r in result.failures]
    checks.append(make_check("attention", problems,
                             f"attention of layers {list(chosen)} ({src.dims.heads} -> {out.dims.heads} heads) unsharded "
                             f"and sharded over {', '.join(map(str, ctx.tps))} ranks match SRC: max relative error "
                             f"{result.max_error:.2g} (limit {result.tolerance:g})",
                             {"layers": list(chosen), "max_rel_error": result.max_error,
                              "heads": [src.dims.heads, out.dims.heads]},
                             started))
    return checks


def _load(root: Path, block: MLPBlock) -> simulate.MLPData:
    return simulate.MLPData(block, {lin.prefix: {p: map_array(root, i) for p, i in lin.parts.items()} for lin in block.linears})


def hidden(block: MLPBlock) -> int:
    """The hidden size an MLP block maps from and to (gate/up input = down output)."""
    return block.linears[0].in_features
