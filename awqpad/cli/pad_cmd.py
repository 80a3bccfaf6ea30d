"""`awqpad pad SRC OUT --tp N`: write the padded repo, streaming tensor by tensor."""

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

HELP = """Write a padded copy of SRC to OUT that loads at the given TP size(s). SRC is never modified;
OUT appears only when complete (written to a hidden temp sibling, fsynced, then renamed). When nothing
needs padding, OUT is still written: hard links to SRC's files (copies across filesystems), and its
awqpad.json says no padding was needed. With --push-to-hub, the token and the right to write the repo
are checked before anything is padded.

Example: awqpad pad ./Qwen2-72B-Instruct-AWQ ./Qwen2-72B-AWQ-tp4 --tp 4

Exit codes: 0 written (also when nothing needed padding), 2 bad input, 3 blocked, 4 output or upload problem."""

OutArg = Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (must not exist unless --force).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (only after the new output is complete).")]
PushOpt = Annotated[Optional[str], typer.Option("--push-to-hub", metavar="ORG/NAME", show_default=False,
                    help="Upload OUT to this Hub repo after padding (private unless --public; needs a token with write "
                         "access: HF_TOKEN, --token or `hf auth login`). Checked before padding.")]
FollowOpt = Annotated[bool, typer.Option("--follow-symlinks", help="Also copy side files (tokenizer, code, ...) that are "
                      "symlinks to outside SRC; refused by default, since they would land in OUT (and on the Hub with --push-to-hub).")]
PublicOpt = Annotated[bool, typer.Option("--public", help="With --push-to-hub: create the repo public.")]


def render(outcome, src: str, console) -> None:
    plan = outcome.plan
    if outcome.status == "padded":
        dims = ", ".join(f"{key} {d['original']} -> {d['padded']}" for key, d in plan["dims"].items()
                         if d["original"] != d["padded"])
        from awqpad.plan.regroup import describe

        regroup = plan.get("regroup")
        what = f"padded {dims}" if dims else ""
        if regroup:
            text = f"regrouped {describe(regroup)}"
            what = f"{what} and {text}" if what else text
        console.print(f"{esc(what)}: {outcome.padded_tensors} tensors in {len(outcome.shards)} shard(s), "
                      f"{human_bytes(outcome.bytes_written)} in {outcome.seconds:.1f} s -> {esc(outcome.out)}")
    else:
        how = (f"{len(outcome.linked_files)} file(s) hard-linked" if outcome.linked_files else "") + \
              (", " if outcome.linked_files and outcome.copied_files else "") + \
              (f"{len(outcome.copied_files)} copied" if outcome.copied_files else "")
        console.print(f"{esc(outcome.status)}: {esc(src)} already loads at TP {', '.join(map(str, outcome.tp))} under "
                      f"{esc(outcome.engine)} rules; wrote {esc(outcome.out)} ({esc(how)}; no padding needed)")
    for name in outcome.skipped_files:
        console.print(f"  skipped {esc(name)} (non-safetensors weights would be stale copies)")
    if outcome.pushed:
        console.print(f"pushed -> {esc(outcome.pushed)}")
    console.print("Next:")
    console.print(f"  {esc(f'awqpad verify {shlex.quote(src)} {shlex.quote(outcome.out)}')}")
    for line in outcome.launch:
        console.print(f"  {esc(line)}")


def pad(
    src: SrcArg,
    out_dir: OutArg,
    tp: TpOpt,
    engine: EngineOpt = DEFAULT_ENGINE,
    skip_experts: SkipExpertsOpt = False,
    pad_heads: PadHeadsOpt = False,
    expert_parallel: ExpertParallelOpt = False,
    strategy: StrategyOpt = "auto",
    force: ForceOpt = False,
    follow_symlinks: FollowOpt = False,
    push_repo: PushOpt = None,
    public: PublicOpt = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from awqpad import api

    out = Output(json_out, quiet)
    outcome = api.pad(src, out_dir, tp, engine=engine, skip_experts=skip_experts, pad_heads=pad_heads,
                      expert_parallel=expert_parallel, strategy=strategy, force=force,
                      push_to_hub=push_repo, public=public, follow_symlinks=follow_symlinks, revision=revision, token=token, cache_dir=cache_dir,
                      progress=out.progress, notify=out.info, progress_bars=out.interactive)
    for warning in outcome.warnings:
        out.warn(warning)
    out.result(outcome, lambda console: render(outcome, src, console))
