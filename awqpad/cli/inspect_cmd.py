"""`awqpad inspect SRC`: what this checkpoint is and which TP sizes work today."""

from __future__ import annotations

from awqpad.cli.options import CacheDirOpt, EngineOpt, JsonOpt, QuietOpt, RevisionOpt, SrcArg, TokenOpt
from awqpad.cli.output import Output, esc
from awqpad.engines.profiles import DEFAULT_ENGINE

HELP = "Describe a checkpoint: format, quant config, dims, and which TP sizes load today (reads headers only).\n\nExample: awqpad inspect ./Qwen2-72B-Instruct-AWQ"

STATUS_STYLE = {"loadable": "green", "needs padding": "yellow", "blocked": "red", "not padded": "magenta"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def render(report, console) -> None:
    from rich.table import Table

    q = report.quantization
    console.print(f"[bold]{esc(report.source)}[/]" + (f" @ {esc(report.revision)}" if report.revision else ""))
    family = report.family if report.family_known else f"{report.family} (unknown architecture: generic patterns)"
    console.print(f"  architecture  {esc(report.architecture)}  [dim]family {esc(family)}[/]")
    quant = ", ".join(f"{k}={v}" for k, v in q.items() if k not in ("method", "config_groups", "config") and v not in (None, [], {}))
    console.print(f"  format        {esc(report.format)}  [dim]{esc(quant)}[/]")
    d = report.dims
    console.print(f"  attention     {d['heads']} heads, {d['kv_heads']} KV heads, head_dim {d['head_dim']}, hidden {d['hidden_size']}, {d['layers']} layers")
    for key, value in d.items():
        if isinstance(value, dict):
            cfg = "" if value["config"] in (None, value["tensors"]) else f"  [red](config.json says {esc(value['config'])})[/]"
            console.print(f"  {esc(f'{key:<13}')} {esc(value['tensors'])}{cfg}")
    if "experts" in d:
        console.print(f"  experts       {d['experts']} per MoE layer")
    console.print(
        f"  linears       {report.linears_quantized} quantized, {report.linears_unquantized} unquantized; "
        f"{report.mlp_blocks} MLP blocks; {report.vision_tensors} vision-tower tensors left alone"
    )
    console.print(f"  size          {human_bytes(report.total_bytes)} in {len(report.shards)} shard(s), {report.tensors} tensors")
    for f in report.findings:
        style = {"error": "red", "warning": "yellow"}.get(f["level"], "dim")
        console.print(f"  [{style}]{esc(f['level'])}: {esc(f['message'])}[/]")
    table = Table(title=f"Tensor parallelism ({esc(report.engine)} rules)", title_justify="left")
    table.add_column("TP", justify="right")
    table.add_column("status", no_wrap=True)
    table.add_column("why")
    for row in report.tp_table:
        table.add_row(str(row.tp), f"[{STATUS_STYLE[row.status]}]{esc(row.status)}[/]", esc(row.detail))
    console.print(table)


def inspect(src: SrcArg, engine: EngineOpt = DEFAULT_ENGINE, revision: RevisionOpt = None, token: TokenOpt = None,
            cache_dir: CacheDirOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    from awqpad import api

    out = Output(json_out, quiet)
    report = api.inspect(src, engine=engine, revision=revision, token=token, cache_dir=cache_dir,
                         progress_bars=out.interactive)
    if report.fetched_bytes is not None:
        out.info(f"fetched {human_bytes(report.fetched_bytes)} from the Hub (config, index, safetensors headers; no weights)")
    out.result(report, lambda console: render(report, console))
