"""`awqpad verify [SRC] OUT --tp N`: prove a padded repo is exact and loads at TP (wiring and rendering only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from awqpad.cli.options import JsonOpt, QuietOpt
from awqpad.cli.output import Output
from awqpad.engines.profiles import DEFAULT_ENGINE, ENGINE_CHOICES
from awqpad.errors import InputError, VerifyFailed
from awqpad.source import bounded_json, resolve_source
from awqpad.verify import PROVENANCE, VerifyReport, verify_output

HELP = """Check a padded repo written by `awqpad pad`: alone (OUT), or against its source (SRC OUT).

\b
OUT alone: the repo reads cleanly (config, index, every shard header); awqpad.json matches the files;
config.json agrees with the tensors; the engine's per-rank rules hold at each --tp and every rank gets
whole packed words and whole quantization groups; every padded element holds the recorded fill and
every padded row/column dequantizes to exactly 0.0 under every reader of its format.
SRC OUT adds: tensors pad did not touch are byte-identical to SRC (streamed, not loaded); the original
region of each padded tensor is byte-identical; sampled MLP layers (first, middle, last; for MoE three
experts per layer and the shared expert) are sharded per rank the way vLLM shards them, run in float64,
summed as the all-reduce sums them, and compared with the unpadded, unsharded SRC layer (fails above
1e-9 relative; layers over 33.6M weights run on whole groups at rank edges and the padded tail); and the
report says what the unpadded SRC would have done at that TP (informational, marked i).

\b
Examples:
  awqpad verify ./Qwen2-72B-Instruct-AWQ ./Qwen2-72B-AWQ-tp4 --tp 4
  awqpad verify ./Qwen2-72B-AWQ-tp4 --tp 4 --tp 2 --json

\b
--tp and --engine default to what awqpad.json records.
Exit codes: 0 every check passed; 1 a check failed, including a damaged OUT (truncated shard, index
naming the wrong shard, missing tensor, bad awqpad.json); 2 bad usage or input: wrong number of paths,
unknown engine, SRC missing or unreadable, OUT not a directory, or OUT without awqpad.json and no SRC."""

PathsArg = Annotated[list[str], typer.Argument(help="[SRC] OUT: the padded repo, optionally preceded by its source.",
                                               show_default=False, metavar="[SRC] OUT")]
TpOptional = Annotated[Optional[list[int]], typer.Option("--tp", help="Tensor-parallel size to check; repeat for several. "
                                                         "Default: the sizes recorded in awqpad.json.", min=1)]
EngineOptional = Annotated[Optional[str], typer.Option("--engine", "-e", help=f"Engine rules: {', '.join(ENGINE_CHOICES)}. "
                                                       "Default: the engine recorded in awqpad.json, else vllm.")]
LayersOpt = Annotated[str, typer.Option("--layers", help="MLP layers to simulate against SRC: sample (first, middle, "
                                        "last), all, none (static checks only), or a list like 0,5,11.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the random inputs and the expert sample.")]


def _recorded(out_dir: Path) -> dict:
    """awqpad.json's defaults for --tp / --engine; {} if it is missing or unusable (the provenance check says why)."""
    try:
        data = bounded_json.read(Path(out_dir) / PROVENANCE, "provenance")
        return data if isinstance(data, dict) else {}
    except InputError:
        return {}


def render(report: VerifyReport, console: Console) -> None:
    head = f"[bold]{escape(report.out)}[/]" + (f"  vs  {escape(report.src)}" if report.src else "")
    console.print(f"{head}  TP {', '.join(map(str, report.tp))}, {report.engine}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(width=1)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for check in report.checks:
        info = check.figures.get("informational")
        mark = "[cyan]i[/]" if info else ("[green]✓[/]" if check.ok else "[red]✗[/]")
        table.add_row(mark, escape(check.name), escape(check.detail))
        if not check.ok:
            for extra in check.figures.get("problems", [])[1:4]:
                table.add_row("", "", f"[dim]{escape(extra)}[/]")
    console.print(table)
    failed = report.failed
    if failed:
        console.print(f"[red]FAILED[/]: {len(failed)} of {len(report.checks)} checks ({', '.join(c.name for c in failed)}) "
                      f"in {report.seconds:.1f} s")
    else:
        console.print(f"[green]PASSED[/]: all {len(report.checks)} checks in {report.seconds:.1f} s")


def verify(
    paths: PathsArg,
    tp: TpOptional = None,
    engine: EngineOptional = None,
    layers: LayersOpt = "sample",
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    if not 1 <= len(paths) <= 2:
        raise InputError(f"expected OUT or SRC OUT, got {len(paths)} paths")
    src_spec, out_spec = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    out = Output(json_out, quiet)
    out_source = resolve_source(out_spec, progress=out.interactive)
    src_source = resolve_source(src_spec, progress=out.interactive) if src_spec is not None else None
    recorded = _recorded(out_source.root)
    tps = tuple(tp) if tp else tuple(t for t in recorded.get("tp") or () if isinstance(t, int))
    if not tps:
        raise InputError(f"--tp is required: {out_spec} has no usable {PROVENANCE} recording the TP size")
    engine = engine or (recorded.get("engine") if recorded.get("engine") in ENGINE_CHOICES else DEFAULT_ENGINE)
    report = verify_output(out_source, tps, engine, src_source, layers, seed, progress=out.progress)
    out.result(report, lambda console: render(report, console))
    if not report.passed:
        raise typer.Exit(VerifyFailed.exit_code)
