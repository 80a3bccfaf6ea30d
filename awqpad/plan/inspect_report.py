"""What `inspect` reports: a plain dataclass built from a Checkpoint (rendered by the CLI or as JSON)."""

from __future__ import annotations

from dataclasses import dataclass

from awqpad.checkpoint.model import Checkpoint
from awqpad.plan.pad_plan import make_plan

INSPECT_TPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class TpStatus:
    tp: int
    status: str  # loadable | needs padding | blocked | not padded (a quantization awqpad does not pad)
    detail: str


@dataclass(frozen=True)
class InspectReport:
    source: str
    revision: str | None
    architecture: str
    family: str
    family_known: bool
    format: str
    quantization: dict
    dims: dict
    linears_quantized: int
    linears_unquantized: int
    mlp_blocks: int
    vision_tensors: int
    tensors: int
    total_bytes: int
    shards: tuple[str, ...]
    engine: str
    tp_table: tuple[TpStatus, ...]
    findings: tuple[dict, ...]
    fetched_bytes: int | None = None  # hub sources: what describing it cost


def _quant_summary(ckpt: Checkpoint) -> dict:
    q = ckpt.quant
    out = {"method": q.method}
    if q.method == "none":
        return out
    out.update(bits=ckpt.bits, group_size=ckpt.group_size)
    if q.method == "awq":
        out.update(version=q.version, zero_point=not q.sym, modules_to_not_convert=list(q.not_converted))
    elif q.method == "gptq":
        out.update(sym=q.sym, desc_act=q.desc_act, checkpoint_format=q.checkpoint_format, pack_dtype=q.pack_dtype,
                   dynamic={k: v for k, v in q.dynamic})
    elif q.method == "compressed-tensors":
        out.update(format=q.checkpoint_format, ignore=list(q.not_converted),
                   config_groups={g["_name"]: {"targets": g.get("targets"), "weights": g.get("weights")} for g in q.ct_groups})
    else:
        out["config"] = q.raw
    if ckpt.foreign is not None:
        out.update(recognised=ckpt.foreign.label, already_quantized=True, tp_behaviour=ckpt.foreign.tp)
    return out


def _dims_summary(ckpt: Checkpoint) -> dict:
    d = ckpt.dims
    out = {"hidden_size": d.hidden, "layers": d.layers, "heads": d.heads, "kv_heads": d.kv_heads, "head_dim": d.head_dim}
    for kind, widths in d.widths.items():
        key = ckpt.config_key(kind) or f"{kind}_width"
        out[key if key not in out else f"{kind}:{key}"] = {
            "tensors": widths[0] if len(widths) == 1 else list(widths),
            "config": ckpt.config.get(key) if ckpt.config_key(kind) else None,
        }
    if d.num_experts:
        out["experts"] = d.num_experts
    return out


def tp_table(ckpt: Checkpoint, engine: str = "vllm", tps=INSPECT_TPS) -> tuple[TpStatus, ...]:
    rows = []
    if ckpt.foreign is not None and not ckpt.foreign.engine_pads:
        return tuple(TpStatus(t, "not padded", f"awqpad does not pad {ckpt.foreign.label}") for t in tps)
    for t in tps:
        plan = make_plan(ckpt, (t,), engine)
        if plan.blocked:
            rows.append(TpStatus(t, "blocked", "; ".join(dict.fromkeys(b.explanation or b.message for b in plan.blockers))))
        elif plan.needs_padding:
            rows.append(TpStatus(t, "needs padding", ", ".join(f"{d.config_key or d.kind} {d.original} -> {d.padded}" for d in plan.changed_dims)))
        else:
            rows.append(TpStatus(t, "loadable", "; ".join(plan.warnings)))
    return tuple(rows)


def inspect_report(ckpt: Checkpoint, engine: str = "vllm") -> InspectReport:
    quantized = sum(1 for lin in ckpt.linears if lin.quantized)
    return InspectReport(
        source=ckpt.source.source_id,
        revision=ckpt.source.revision,
        architecture=ckpt.config.wrapper_architecture or ckpt.config.architecture,
        family=ckpt.family.name,
        family_known=ckpt.family_known,
        format=ckpt.format,
        quantization=_quant_summary(ckpt),
        dims=_dims_summary(ckpt),
        linears_quantized=quantized,
        linears_unquantized=len(ckpt.linears) - quantized,
        mlp_blocks=len(ckpt.mlps),
        vision_tensors=ckpt.vision_tensors,
        tensors=len(ckpt.tensors),
        total_bytes=ckpt.total_bytes,
        shards=tuple(s.filename for s in ckpt.shards),
        engine=engine,
        tp_table=tp_table(ckpt, engine),
        findings=tuple({"level": f.level, "message": f.message} for f in ckpt.findings),
    )
