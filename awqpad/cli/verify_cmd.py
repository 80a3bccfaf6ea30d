"""`awqpad verify [SRC] OUT --tp N`: prove a padded repo is exact and loads at TP (wiring and rendering only)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from awqpad.cli.options import CacheDirOpt, JsonOpt, QuietOpt, TokenOpt, parse_tp
from awqpad.cli.output import Output, esc
from awqpad.engines.profiles import ENGINE_CHOICES

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
TpOptional = Annotated[Optional[list[str]], typer.Option("--tp", "--tensor-parallel-size", metavar="TP", callback=parse_tp,
                                                         help="Tensor-parallel size(s) to check: --tp 4, --tp 2,4 or "
                                                         "repeated. Default: the sizes recorded in awqpad.json.")]
EngineOptional = Annotated[Optional[str], typer.Option("--engine", "-e", metavar="ENGINE",
                                                       help=f"Engine rules: {', '.join(ENGINE_CHOICES)}. "
                                                       "Default: the engine recorded in awqpad.json, else vllm.")]
LayersOpt = Annotated[str, typer.Option("--layers", metavar="LAYERS", help="MLP layers to simulate against SRC: sample "
                                        "(first, middle, last), all, none (static checks only), or a list like 0,5,11.")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="SEED", help="Seed for the random inputs and the expert sample.")]


def render(report, console) -> None:
    from rich.table import Table

    head = f"[bold]{esc(report.out)}[/]" + (f"  vs  {esc(report.src)}" if report.src else "")
    console.print(f"{head}  TP {', '.join(map(str, report.tp))}, {esc(report.engine)}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(width=1)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for check in report.checks:
        info = check.figures.get("informational")
        mark = "[cyan]i[/]" if info else ("[green]✓[/]" if check.ok else "[red]✗[/]")
        table.add_row(mark, esc(check.name), esc(check.detail))
        if not check.ok:
            for extra in check.figures.get("problems", [])[1:4]:
                table.add_row("", "", f"[dim]{esc(extra)}[/]")
    console.print(table)
    failed = report.failed
    if failed:
        console.print(f"[red]FAILED[/]: {len(failed)} of {len(report.checks)} checks ({esc(', '.join(c.name for c in failed))}) "
                      f"in {report.seconds:.1f} s")
    else:
        console.print(f"[green]PASSED[/]: all {len(report.checks)} checks in {report.seconds:.1f} s")


def verify(
    paths: PathsArg,
    tp: TpOptional = None,
    engine: EngineOptional = None,
    layers: LayersOpt = "sample",
    seed: SeedOpt = 0,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from awqpad import api
    from awqpad.errors import InputError, VerifyFailed

    if not 1 <= len(paths) <= 2:
        raise InputError(f"expected OUT or SRC OUT, got {len(paths)} paths")
    src_spec, out_spec = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    out = Output(json_out, quiet)
    report = api.verify(out_spec, src_spec, tp=tp, engine=engine, layers=layers, seed=seed, token=token,
                        cache_dir=cache_dir, progress=out.progress, progress_bars=out.interactive)
    out.result(report, lambda console: render(report, console))
    if not report.passed:
        raise typer.Exit(VerifyFailed.exit_code)
