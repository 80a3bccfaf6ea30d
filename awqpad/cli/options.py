"""Shared option aliases, defined once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from awqpad.engines.profiles import DEFAULT_ENGINE, ENGINE_CHOICES

SrcArg = Annotated[str, typer.Argument(help="Checkpoint directory, Hugging Face repo id org/name[@revision], or a cached repo.", show_default=False)]
TpOpt = Annotated[list[int], typer.Option("--tp", help="Tensor-parallel size; repeat for several (--tp 2 --tp 4).", min=1)]
EngineOpt = Annotated[str, typer.Option("--engine", "-e", help=f"Engine rules: {', '.join(ENGINE_CHOICES)}.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No output except errors.")]
SkipExpertsOpt = Annotated[bool, typer.Option("--skip-experts", help="Leave MoE expert widths alone.")]
DEFAULT_ENGINE_NAME = DEFAULT_ENGINE
OptionalStr = Optional[str]
StrategyOpt = Annotated[str, typer.Option("--strategy", help="How to make widths split: pad (zero-pad in whole groups), "
                        "regroup (split quantization groups into smaller ones, exact), auto (the cheapest exact mix).")]
PadHeadsOpt = Annotated[bool, typer.Option("--pad-heads", help="Also pad attention heads (zero heads inside each KV group, "
                        "or whole new KV groups) when the head count blocks the TP size.")]
ExpertParallelOpt = Annotated[bool, typer.Option("--expert-parallel", help="The engine will run MoE experts with expert "
                              "parallelism (vLLM --enable-expert-parallel, SGLang --ep-size): experts are not split, so "
                              "their widths are checked whole.")]
