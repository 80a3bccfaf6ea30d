"""`awqpad plan SRC --tp N`: what padding each TP / engine needs, and what it costs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from awqpad.cli.inspect_cmd import human_bytes
from awqpad.cli.options import (
    CacheDirOpt, EngineOpt, ExpertParallelOpt, JsonOpt, PadHeadsOpt, QuietOpt, RevisionOpt, SkipExpertsOpt, SrcArg,
    StrategyOpt, TokenOpt, TpOpt,
)
from awqpad.cli.output import Output, esc
from awqpad.engines.profiles import DEFAULT_ENGINE

HELP = """Show what padding the given TP size(s) need on an engine, and what it costs (reads headers only).

Example: awqpad plan ./Qwen2-72B-Instruct-AWQ --tp 4

Exit codes: 0 the TP sizes work after padding (or already work), 3 blocked by something padding cannot fix, 2 bad input."""

TensorsOpt = Annotated[bool, typer.Option("--tensors", help="List every tensor that changes, old shape -> new shape.")]


def next_commands(plan, src: str) -> dict:
    """The pad command (if padding is needed) and the launch line of every engine the plan was made for."""
    from awqpad.engines.launch import launch_lines

    tps = " ".join(f"--tp {t}" for t in plan.tp)
    engine = ("" if plan.engine == DEFAULT_ENGINE else f" --engine {plan.engine}") + (" --pad-heads" if plan.pad_heads else "")
    engine += "" if plan.strategy == "auto" else f" --strategy {plan.strategy}"
    engine += " --expert-parallel" if plan.expert_parallel else ""
    local = Path(src)
    name = f"{local.name}-tp{max(plan.tp)}"
    out_dir = str(local.parent / name) if local.exists() else name
    launch = launch_lines(plan.engines, out_dir if plan.needs_padding else src, max(plan.tp), plan.expert_parallel)
    return {
        "pad": f"awqpad pad {shlex.quote(src)} {shlex.quote(out_dir)} {tps}{engine}" if plan.needs_padding else None,
        "serve": launch[0] if launch else None,
        "launch": list(launch),
    }


def render_candidates(plan, console) -> None:
    from rich.table import Table

    if len(plan.candidates) < 2:
        return
    table = Table(title=f"Candidates (--strategy {plan.strategy})", title_justify="left")
    for col in ("", "candidate", "+% bytes", "+% FLOPs", "why not"):
        table.add_column(col)
    for c in plan.candidates:
        table.add_row("[green]✓[/]" if c.chosen else "✗", esc(c.name), f"{c.added_percent:.2f}", f"{c.added_flops_percent:.2f}",
                      esc(c.rejected or "cheapest exact plan"))
    console.print(table)


def render(plan, summary: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{esc(plan.source_id)}[/]  {esc(plan.format)}" + (f", {plan.bits}-bit, group {plan.group_size}" if plan.bits else ""))
    table = Table(title="Before padding", title_justify="left")
    table.add_column("engine")
    table.add_column("TP", justify="right")
    table.add_column("result")
    for engine in plan.engines:
        for t in plan.tp:
            fails = [v for v in plan.violations_before if v.engine == engine and v.tp == t]
            if not fails:
                table.add_row(esc(engine), str(t), "[green]✓ loads[/]")
            for i, v in enumerate(fails):
                mark = "[yellow]~ slower kernel[/]" if v.severity == "fallback" else "[red]✗[/]"
                table.add_row(esc(engine) if i == 0 else "", str(t) if i == 0 else "",
                              f"{mark} {esc(v.explanation)} {esc(f'[{v.rule}]')}\n  [dim]{esc(v.message)}[/]")
    console.print(table)
    changed = plan.changed_dims
    if changed:
        dims = Table(title="Padding plan", title_justify="left")
        for col in ("dimension", "original", "padded", "modules", "added bytes", "+% weight/FLOPs"):
            dims.add_column(col, justify="left" if col == "dimension" else "right",
                            overflow="fold" if col == "dimension" else "ellipsis")
        for d in changed:
            dims.add_row(esc(d.config_key or f"{d.kind} (derived)"), str(d.original), str(d.padded), str(d.modules),
                         human_bytes(d.added_bytes), f"{100 * d.added_fraction:.2f}")
        console.print(dims)
        console.print(f"  total: +{human_bytes(plan.added_bytes)} ({summary['added_percent']:.3f} % of {human_bytes(plan.total_bytes)})")
    if plan.regroup is not None:
        rg = plan.regroup
        from awqpad.plan.regroup import describe
        from awqpad.serialize import to_data

        console.print(f"Regroup: {esc(describe(to_data(rg)))} in {rg.modules} linears "
                      f"(+{human_bytes(rg.added_bytes)} of scales{'' if rg.block else ' and zeros'}, +0 % FLOPs; "
                      "every weight unchanged)")
        if not changed:
            console.print(f"  total: +{human_bytes(plan.added_bytes)} ({summary['added_percent']:.3f} % of {human_bytes(plan.total_bytes)})")
    elif not changed and not plan.blocked:
        console.print("[green]No padding needed[/]: every requested TP already satisfies the rules.")
    render_candidates(plan, console)
    if plan.heads is not None:
        console.print(f"  heads: {esc(plan.heads.summary)}")
    for note in plan.notes:
        console.print(f"  [dim]note: {esc(note)}[/]")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {esc(w)}")
    for b in plan.blockers:
        near = f" (nearest TP that works: {', '.join(map(str, b.nearest_tp))})" if b.nearest_tp else ""
        console.print(f"[red]blocked[/] {esc(b.engine)} TP={b.tp}: {esc(b.explanation or b.message)}{near} "
                      f"{esc(f'[{b.rule}]')}\n  [dim]{esc(b.message)}[/]")
    if "tensors" in summary:
        tens = Table(title="Tensors that change", title_justify="left")
        tens.add_column("tensor")
        tens.add_column("old")
        tens.add_column("new")
        for row in summary["tensors"]:
            tens.add_row(esc(row["name"]), esc(row.get("old_shape", row.get("old_value"))),
                         esc(row.get("new_shape", row.get("new_value"))))
        console.print(tens)
    if not plan.blocked:
        nxt = summary["next"]
        console.print("\nNext:")
        if nxt["pad"]:
            console.print(f"  {esc(nxt['pad'])}")
        for line in nxt["launch"]:
            console.print(f"  {esc(line)}")


GpusOpt = Annotated[Optional[int], typer.Option("--gpus", min=1, metavar="N", show_default=False,
                   help="Plan a deployment on N GPUs: every TP / TP x PP / TP + EP layout, ranked.")]
GpuMemoryOpt = Annotated[Optional[str], typer.Option("--gpu-memory", metavar="SIZE", show_default=False,
                         help="With --gpus: memory of one GPU (80GB, 80GiB): adds KV-cache room and context per layout.")]
NodesOpt = Annotated[int, typer.Option("--nodes", min=1, metavar="M", help="With --gpus: the GPUs are spread over M nodes.")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-model-len", min=1, metavar="TOKENS", show_default=False,
                      help="With --gpu-memory: one sequence must fit (default: max_position_embeddings).")]
KvDtypeOpt = Annotated[str, typer.Option("--kv-cache-dtype", metavar="DTYPE", help="With --gpu-memory: auto (model dtype) or fp8.")]


def plan(
    src: SrcArg,
    tp: Annotated[Optional[list[str]], TpOpt.__metadata__[0]] = None,
    engine: EngineOpt = DEFAULT_ENGINE,
    skip_experts: SkipExpertsOpt = False,
    pad_heads: PadHeadsOpt = False,
    expert_parallel: ExpertParallelOpt = False,
    strategy: StrategyOpt = "auto",
    gpus: GpusOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    nodes: NodesOpt = 1,
    max_model_len: MaxLenOpt = None,
    kv_cache_dtype: KvDtypeOpt = "auto",
    tensors: TensorsOpt = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from awqpad import api
    from awqpad.errors import BlockedError, InputError
    from awqpad.plan.summary import plan_summary

    if not tp and gpus is None:
        raise InputError("give --tp N (which padding a TP size needs) or --gpus N (which layout to run on N GPUs)")
    if gpus is not None and (tp or pad_heads or skip_experts or expert_parallel):
        raise InputError("--gpus plans every layout itself; drop --tp / --pad-heads / --skip-experts / --expert-parallel")
    if gpus is None and (gpu_memory or nodes != 1 or max_model_len):
        raise InputError("--gpu-memory, --nodes and --max-model-len go with --gpus N")
    out = Output(json_out, quiet)
    if gpus is not None:
        _deploy(src, gpus, engine, gpu_memory, nodes, max_model_len, kv_cache_dtype, revision, token, cache_dir, out)
        return
    result, source, _ = api.plan_with_source(src, tp, engine=engine, skip_experts=skip_experts, pad_heads=pad_heads,
                                             expert_parallel=expert_parallel, strategy=strategy, revision=revision,
                                             token=token,
                                             cache_dir=cache_dir, progress_bars=out.interactive)
    summary = plan_summary(result, tensors)
    if source.is_hub:
        out.info(f"fetched {human_bytes(source.fetched_bytes)} from the Hub (config, index, safetensors headers; no weights)")
        summary["fetched_bytes"] = source.fetched_bytes
    summary["next"] = next_commands(result, api.source_spec(src, revision))
    out.result(summary, lambda console: render(result, summary, console))
    if result.blocked:  # an unsupported input is exit 2 whatever the TP; a TP that padding cannot reach is 3
        from awqpad.errors import UnsupportedError

        raise typer.Exit(UnsupportedError.exit_code if result.unsupported is not None else BlockedError.exit_code)


def _deploy(src, gpus, engine, gpu_memory, nodes, max_model_len, kv_cache_dtype, revision, token, cache_dir, out) -> None:
    from awqpad import api
    from awqpad.checkpoint.model import read_checkpoint
    from awqpad.cli.deploy_view import deploy_summary, render_deploy
    from awqpad.engines.profiles import check_engine
    from awqpad.errors import InputError
    from awqpad.plan.deploy import KV_DTYPE_BYTES, parse_memory, plan_deployment
    from awqpad.source.hub_settings import hub_settings

    check_engine(engine)
    if gpus % nodes:
        raise InputError(f"--gpus {gpus} does not split evenly over --nodes {nodes}")
    if kv_cache_dtype not in KV_DTYPE_BYTES:
        raise InputError(f"--kv-cache-dtype {kv_cache_dtype!r}: expected one of {', '.join(KV_DTYPE_BYTES)}")
    try:
        memory = parse_memory(gpu_memory) if gpu_memory else None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with hub_settings(token, cache_dir):
        source = api._resolve(src, revision, True, out.interactive)
        ckpt = read_checkpoint(source)
    deployment = plan_deployment(ckpt, gpus, engine=engine, nodes=nodes, src=api.source_spec(src, revision),
                                 gpu_memory=memory, max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype)
    if source.is_hub:
        out.info(f"fetched {human_bytes(source.fetched_bytes)} from the Hub (config, index, safetensors headers; no weights)")
    out.result(deploy_summary(deployment), lambda console: render_deploy(deployment, console))
