"""`awqpad inspect SRC`: what this checkpoint is and which TP sizes work today."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from awqpad.checkpoint.model import read_checkpoint
from awqpad.cli.options import EngineOpt, JsonOpt, QuietOpt, SrcArg
from awqpad.cli.output import Output
from awqpad.engines.profiles import DEFAULT_ENGINE, check_engine
from awqpad.plan.inspect_report import InspectReport, inspect_report
from awqpad.source import resolve_source

HELP = "Describe a checkpoint: format, quant config, dims, and which TP sizes load today (reads headers only).\n\nExample: awqpad inspect ./Qwen2-72B-Instruct-AWQ"

STATUS_STYLE = {"loadable": "green", "needs padding": "yellow", "blocked": "red", "not padded": "magenta"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def render(report: InspectReport, console: Console) -> None:
    q = report.quantization
    console.print(f"[bold]{report.source}[/]" + (f" @ {report.revision}" if report.revision else ""))
    family = report.family if report.family_known else f"{report.family} (unknown architecture: generic patterns)"
    console.print(f"  architecture  {report.architecture}  [dim]family {family}[/]")
    quant = ", ".join(f"{k}={v}" for k, v in q.items() if k not in ("method", "config_groups", "config") and v not in (None, [], {}))
    console.print(f"  format        {report.format}  [dim]{quant}[/]")
    d = report.dims
    console.print(f"  attention     {d['heads']} heads, {d['kv_heads']} KV heads, head_dim {d['head_dim']}, hidden {d['hidden_size']}, {d['layers']} layers")
    for key, value in d.items():
        if isinstance(value, dict):
            cfg = "" if value["config"] in (None, value["tensors"]) else f"  [red](config.json says {value['config']})[/]"
            console.print(f"  {key:<13} {value['tensors']}{cfg}")
    if "experts" in d:
        console.print(f"  experts       {d['experts']} per MoE layer")
    console.print(
        f"  linears       {report.linears_quantized} quantized, {report.linears_unquantized} unquantized; "
        f"{report.mlp_blocks} MLP blocks; {report.vision_tensors} vision-tower tensors left alone"
    )
    console.print(f"  size          {human_bytes(report.total_bytes)} in {len(report.shards)} shard(s), {report.tensors} tensors")
    for f in report.findings:
        style = {"error": "red", "warning": "yellow"}.get(f["level"], "dim")
        console.print(f"  [{style}]{f['level']}: {f['message']}[/]")
    table = Table(title=f"Tensor parallelism ({report.engine} rules)", title_justify="left")
    table.add_column("TP", justify="right")
    table.add_column("status")
    table.add_column("why")
    for row in report.tp_table:
        table.add_row(str(row.tp), f"[{STATUS_STYLE[row.status]}]{row.status}[/]", row.detail)
    console.print(table)


def inspect(src: SrcArg, engine: EngineOpt = DEFAULT_ENGINE, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    check_engine(engine)
    out = Output(json_out, quiet)
    source = resolve_source(src, headers_only=True, progress=out.interactive)
    report = inspect_report(read_checkpoint(source), engine)
    if source.is_hub:
        out.info(f"fetched {human_bytes(source.fetched_bytes)} from the Hub (config, index, safetensors headers; no weights)")
        report = dataclasses.replace(report, fetched_bytes=source.fetched_bytes)
    out.result(report, lambda console: render(report, console))
