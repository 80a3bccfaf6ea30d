"""`awqpad plan SRC --tp N`: what padding each TP / engine needs, and what it costs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from awqpad.checkpoint.model import read_checkpoint
from awqpad.cli.inspect_cmd import human_bytes
from awqpad.cli.options import EngineOpt, JsonOpt, PadHeadsOpt, QuietOpt, SkipExpertsOpt, SrcArg, TpOpt
from awqpad.cli.output import Output
from awqpad.engines.launch import launch_command
from awqpad.engines.profiles import DEFAULT_ENGINE, ENGINES, check_engine
from awqpad.errors import BlockedError
from awqpad.plan.pad_plan import PadPlan, make_plan, plan_summary
from awqpad.source import resolve_source

HELP = """Show what padding the given TP size(s) need on an engine, and what it costs (reads headers only).

Example: awqpad plan ./Qwen2-72B-Instruct-AWQ --tp 4

Exit codes: 0 the TP sizes work after padding (or already work), 3 blocked by something padding cannot fix, 2 bad input."""

TensorsOpt = Annotated[bool, typer.Option("--tensors", help="List every tensor that changes, old shape -> new shape.")]


def serve_command(engine: str, path: str, tp: int) -> str:
    return launch_command(engine if engine in ENGINES else DEFAULT_ENGINE, path, tp)


def next_commands(plan: PadPlan, src: str) -> dict:
    tps = " ".join(f"--tp {t}" for t in plan.tp)
    engine = ("" if plan.engine == DEFAULT_ENGINE else f" --engine {plan.engine}") + (" --pad-heads" if plan.pad_heads else "")
    local = Path(src)
    name = f"{local.name}-tp{max(plan.tp)}"
    out_dir = str(local.parent / name) if local.exists() else name
    return {
        "pad": f"awqpad pad {src} {out_dir} {tps}{engine}" if plan.needs_padding else None,
        "serve": serve_command(plan.engine, out_dir if plan.needs_padding else src, max(plan.tp)),
    }


def render(plan: PadPlan, summary: dict, console: Console) -> None:
    console.print(f"[bold]{plan.source_id}[/]  {plan.format}" + (f", {plan.bits}-bit, group {plan.group_size}" if plan.bits else ""))
    table = Table(title="Before padding", title_justify="left")
    table.add_column("engine")
    table.add_column("TP", justify="right")
    table.add_column("result")
    for engine in plan.engines:
        for t in plan.tp:
            fails = [v for v in plan.violations_before if v.engine == engine and v.tp == t]
            if not fails:
                table.add_row(engine, str(t), "[green]✓ loads[/]")
            for i, v in enumerate(fails):
                mark = "[yellow]~ slower kernel[/]" if v.severity == "fallback" else "[red]✗[/]"
                table.add_row(engine if i == 0 else "", str(t) if i == 0 else "", f"{mark} {v.explanation} [{v.rule}]\n  [dim]{v.message}[/]")
    console.print(table)
    changed = plan.changed_dims
    if changed:
        dims = Table(title="Padding plan", title_justify="left")
        for col in ("dimension", "original", "padded", "modules", "added bytes", "+% weight/FLOPs"):
            dims.add_column(col, justify="left" if col == "dimension" else "right")
        for d in changed:
            dims.add_row(d.config_key or f"{d.kind} (derived)", str(d.original), str(d.padded), str(d.modules),
                         human_bytes(d.added_bytes), f"{100 * d.added_fraction:.2f}")
        console.print(dims)
        console.print(f"  total: +{human_bytes(plan.added_bytes)} ({summary['added_percent']:.3f} % of {human_bytes(plan.total_bytes)})")
    elif not plan.blocked:
        console.print("[green]No padding needed[/]: every requested TP already satisfies the rules.")
    if plan.heads is not None:
        console.print(f"  heads: {plan.heads.summary}")
    for note in plan.notes:
        console.print(f"  [dim]note: {note}[/]")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for b in plan.blockers:
        near = f" (nearest TP that works: {', '.join(map(str, b.nearest_tp))})" if b.nearest_tp else ""
        console.print(f"[red]blocked[/] {b.engine} TP={b.tp}: {b.explanation or b.message}{near}\n  [dim]{b.message}[/]")
    if "tensors" in summary:
        tens = Table(title="Tensors that change", title_justify="left")
        tens.add_column("tensor")
        tens.add_column("old")
        tens.add_column("new")
        for row in summary["tensors"]:
            tens.add_row(row["name"], str(row.get("old_shape", row.get("old_value"))), str(row.get("new_shape", row.get("new_value"))))
        console.print(tens)
    if not plan.blocked:
        nxt = summary["next"]
        console.print("\nNext:")
        if nxt["pad"]:
            console.print(f"  {nxt['pad']}")
        console.print(f"  {nxt['serve']}")


def plan(
    src: SrcArg,
    tp: TpOpt,
    engine: EngineOpt = DEFAULT_ENGINE,
    skip_experts: SkipExpertsOpt = False,
    pad_heads: PadHeadsOpt = False,
    tensors: TensorsOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    check_engine(engine)
    out = Output(json_out, quiet)
    source = resolve_source(src, headers_only=True, progress=out.interactive)
    result = make_plan(read_checkpoint(source), tuple(tp), engine, skip_experts, pad_heads)
    summary = plan_summary(result, tensors)
    if source.is_hub:
        out.info(f"fetched {human_bytes(source.fetched_bytes)} from the Hub (config, index, safetensors headers; no weights)")
        summary["fetched_bytes"] = source.fetched_bytes
    summary["next"] = next_commands(result, src)
    out.result(summary, lambda console: render(result, summary, console))
    if result.blocked:
        raise typer.Exit(BlockedError.exit_code)
