"""The documented --json contract of `awqpad plan` / `pad`: a PadPlan as plain data."""

from __future__ import annotations

from awqpad.plan.pad_plan import PadPlan


def plan_summary(plan: PadPlan, with_tensors: bool = False) -> dict:
    """The documented --json contract of `awqpad plan` (stable keys first, details after)."""
    from awqpad.serialize import to_data

    dims = {}
    for d in plan.dims:
        key = d.config_key or f"{d.kind}_width"
        dims[key] = {"original": d.original, "padded": d.padded, "kind": d.kind, "modules": d.modules,
                     "added_bytes": d.added_bytes, "added_percent": round(100 * d.added_fraction, 3), "rules": list(d.reason)}
    hp = plan.heads
    if hp is not None:
        for key, (old, new) in (("num_attention_heads", (hp.heads, hp.new_heads)), ("num_key_value_heads", (hp.kv_heads, hp.new_kv_heads))):
            dims[key] = {"original": old, "padded": new, "kind": "attention"}
    out = {
        "schema_version": plan.schema_version,
        "source": plan.source_id,
        "revision": plan.revision,
        "tp": list(plan.tp),
        "engine": plan.engine,
        "engines": list(plan.engines),
        "format": plan.format,
        "bits": plan.bits,
        "group_size": plan.group_size,
        "needs_padding": plan.needs_padding,
        "blocked": plan.blocked,
        "dims": dims,
        "blockers": [{"rule": b.rule, "message": b.message, "engine": b.engine, "tp": b.tp,
                      "explanation": b.explanation, "nearest_tp": list(b.nearest_tp)} for b in plan.blockers],
        "added_bytes": plan.added_bytes,
        "total_bytes": plan.total_bytes,
        "added_percent": round(100 * plan.added_bytes / plan.total_bytes, 4) if plan.total_bytes else 0.0,
        # MLP FLOPs grow with the width: per padded kind, the extra share of that kind's matmul work
        "added_flops_percent": {d.kind: round(100 * d.added_fraction, 3) for d in plan.changed_dims},
        "config_updates": plan.config_updates,
        "warnings": list(plan.warnings),
        "notes": list(plan.notes),
        "pad_heads": plan.pad_heads,
        "expert_parallel": plan.expert_parallel,
        "strategy": plan.strategy,
        "regroup": None if plan.regroup is None else to_data(plan.regroup),
        "candidates": to_data(plan.candidates),
        "heads": None if hp is None else {
            "strategy": hp.strategy, "original": hp.heads, "padded": hp.new_heads, "kv_original": hp.kv_heads,
            "kv_padded": hp.new_kv_heads, "head_dim": hp.head_dim, "zero_heads": list(hp.zero_heads),
            "added_bytes": hp.added_bytes, "projection_flops_percent": round(100 * hp.proj_flops_increase, 3),
            "attention_flops_percent": round(100 * hp.core_flops_increase, 3),
            "kv_cache_percent": round(100 * hp.kv_cache_increase, 3), "summary": hp.summary,
            "head_dim_support": list(hp.caveats), "unsupported_engines": list(hp.unsupported_engines)},
        "violations_before": to_data(plan.violations_before),
        "violations_after": to_data(plan.violations_after),
    }
    if with_tensors:
        out["tensors"] = [{"name": op.tensor, "old_shape": list(op.old_shape), "new_shape": list(op.new_shape)}
                          for op in plan.ops if op.replace is None] + [
            {"name": op.tensor, "old_value": None, "new_value": list(op.replace)} for op in plan.ops if op.replace is not None]
    return out
