"""Shared option aliases, defined once. Flags follow `hf` and `vllm` where they overlap (--revision,
--token, --cache-dir, --tensor-parallel-size). Importing this module must stay cheap (no numpy, rich or
huggingface_hub): `awqpad --help` imports it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from awqpad.engines.profiles import DEFAULT_ENGINE, ENGINE_CHOICES


def parse_tp(values: list[str] | None) -> list[int] | None:
    """`--tp 2,4,8` and `--tp 2 --tp 4` alike -> [2, 4, 8] (sorted, without duplicates)."""
    if not values:
        return values
    sizes: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part.isdigit() or int(part) < 1:
                raise typer.BadParameter(f"{value!r}: expected a positive integer or a comma-separated list like 2,4,8")
            sizes.append(int(part))
    return sorted(set(sizes))


TP_HELP = "Tensor-parallel size: --tp 4, --tp 2,4,8 or repeated (--tp 2 --tp 4)."
SrcArg = Annotated[str, typer.Argument(metavar="SRC", show_default=False,
                                       help="Checkpoint directory, Hugging Face repo id org/name[@revision], or a cached repo.")]
TpOpt = Annotated[list[str], typer.Option("--tp", "--tensor-parallel-size", metavar="TP", callback=parse_tp, help=TP_HELP)]
EngineOpt = Annotated[str, typer.Option("--engine", "-e", metavar="ENGINE", help=f"Engine rules: {', '.join(ENGINE_CHOICES)}.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (errors too).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No output except errors.")]
SkipExpertsOpt = Annotated[bool, typer.Option("--skip-experts", help="Leave MoE expert widths alone.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", metavar="REV", show_default=False,
                        help="Hub branch, tag or commit of SRC (same as SRC@REV).")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", metavar="TOKEN", show_default=False,
                     help="Hugging Face token (default: HF_TOKEN, or the one saved by `hf auth login`).")]
CacheDirOpt = Annotated[Optional[str], typer.Option("--cache-dir", metavar="DIR", show_default=False,
                        help="Hugging Face Hub cache directory (default: HF_HUB_CACHE, ~/.cache/huggingface/hub).")]
DEFAULT_ENGINE_NAME = DEFAULT_ENGINE
OptionalStr = Optional[str]
StrategyOpt = Annotated[str, typer.Option("--strategy", metavar="pad|regroup|auto", help="How to make widths split: pad (zero-pad in whole groups), "
                        "regroup (split quantization groups into smaller ones, exact), auto (the cheapest exact mix).")]
PadHeadsOpt = Annotated[bool, typer.Option("--pad-heads", help="Also pad attention heads (zero heads inside each KV group, "
                        "or whole new KV groups) when the head count blocks the TP size.")]
ExpertParallelOpt = Annotated[bool, typer.Option("--expert-parallel", help="The engine will run MoE experts with expert "
                              "parallelism (vLLM --enable-expert-parallel, SGLang --ep-size): experts are not split, so "
                              "their widths are checked whole.")]
