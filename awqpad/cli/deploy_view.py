"""Rendering of `awqpad plan SRC --gpus N`: the ranked layouts as a table, then each one's commands."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from awqpad.cli.inspect_cmd import human_bytes
from awqpad.plan.deploy import GPU_MEMORY_UTILIZATION, RESERVE_BYTES, DeployPlan, LayoutReport

NEEDS_STYLE = {"nothing": "green", "regroup": "cyan", "regroup+pad": "cyan", "pad": "cyan", "pad-heads": "cyan", "blocked": "red", "unsupported": "dim"}


def deploy_summary(plan: DeployPlan) -> dict:
    """The documented --json schema of `plan --gpus` (README: "Deployment planner")."""
    return {
        "schema_version": 1,
        "source": plan.source_id,
        "gpus": plan.gpus,
        "nodes": plan.nodes,
        "gpu_memory_bytes": plan.gpu_memory,
        "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        "reserve_bytes": RESERVE_BYTES,
        "max_model_len": plan.max_model_len,
        "kv_cache_dtype": plan.kv_cache_dtype,
        "why": plan.why,
        "layouts": [_row(r, i + 1) for i, r in enumerate(plan.layouts)],
    }


def _row(r: LayoutReport, rank: int) -> dict:
    return {
        "rank": rank, "layout": r.layout.label, "tp": r.layout.tp, "pp": r.layout.pp, "ep": r.layout.ep,
        "engine": r.engine, "needs": r.needs, "reason": r.reason, "exact": r.exact,
        "weight_bytes_per_gpu": r.weight_bytes_per_gpu, "added_bytes_per_gpu": r.added_bytes_per_gpu,
        "added_flops_percent": r.added_flops_percent, "kernel_path": r.kernel_path,
        "kv_bytes_per_token": r.kv_bytes_per_token, "kv_room_bytes": r.kv_room_bytes, "kv_tokens": r.kv_tokens,
        "fits": r.fits, "tp_spans_nodes": r.spans_nodes, "pad_command": r.pad_command, "launch": r.launch,
    }


def _tokens(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def render_deploy(plan: DeployPlan, console: Console) -> None:
    memory = f" of {human_bytes(plan.gpu_memory)}" if plan.gpu_memory else ""
    nodes = f" over {plan.nodes} nodes" if plan.nodes > 1 else ""
    console.print(f"[bold]{escape(plan.source_id)}[/] on {plan.gpus} GPUs{memory}{nodes}")
    table = Table(title_justify="left", show_edge=False, pad_edge=False)
    for col in ("#", "layout", "engine", "needs", "weights/GPU", "+FLOPs", "kernel", "KV tokens"):
        table.add_column(col, justify="right" if col in ("#", "weights/GPU", "+FLOPs", "KV tokens") else "left")
    for i, r in enumerate(plan.layouts, 1):
        style = NEEDS_STYLE.get(r.needs, "")
        fits = "" if r.fits is None else (" ✓" if r.fits else " ✗")
        weights = human_bytes(r.weight_bytes_per_gpu) if r.needs != "unsupported" else "-"
        table.add_row(str(i), r.layout.label, r.engine, f"[{style}]{r.needs}[/]", weights,
                      f"{r.added_flops_percent:g}%", r.kernel_path, _tokens(r.kv_tokens) + fits)
    console.print(table)
    console.print(f"\n{escape(plan.why)}")
    if plan.gpu_memory:
        console.print(f"[dim]KV room = {GPU_MEMORY_UTILIZATION:.0%} of each GPU - weights - {human_bytes(RESERVE_BYTES)} "
                      f"reserve; ✓ = holds one {plan.max_model_len}-token sequence[/]")
    for i, r in enumerate(plan.layouts, 1):
        if r.needs == "unsupported":
            continue
        console.print(f"\n[bold]{i}. {r.layout.label}[/] on {r.engine}: {escape(r.reason)}")
        if r.added_bytes_per_gpu:
            console.print(f"   adds {human_bytes(r.added_bytes_per_gpu)} per GPU")
        if r.spans_nodes:
            console.print("   [yellow]tensor parallelism spans nodes: needs a fast interconnect[/]")
        for command in (r.pad_command, r.launch):
            if command:
                console.print(f"   {escape(command)}", soft_wrap=True)
