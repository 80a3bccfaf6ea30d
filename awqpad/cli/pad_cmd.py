"""`awqpad pad SRC OUT --tp N`: write the padded repo, streaming tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from awqpad.checkpoint.model import read_checkpoint
from awqpad.cli.inspect_cmd import human_bytes
from awqpad.cli.options import (EngineOpt, ExpertParallelOpt, JsonOpt, PadHeadsOpt, QuietOpt, SkipExpertsOpt, SrcArg,
                                StrategyOpt, TpOpt)
from awqpad.cli.output import Output
from awqpad.cli.plan_cmd import serve_command
from awqpad.engines.profiles import DEFAULT_ENGINE, check_engine
from awqpad.checkpoint.foreign import refuse
from awqpad.errors import BlockedError, InputError, UnsupportedError
from awqpad.source.push import push_to_hub
from awqpad.execute.output_repo import PROVENANCE, pad_to_directory
from awqpad.plan.summary import plan_summary
from awqpad.plan.strategy import DEFAULT_STRATEGY, check_strategy, plan_with_strategy
from awqpad.source import parse_repo_spec, resolve_source

HELP = """Write a padded copy of SRC to OUT that loads at the given TP size(s). SRC is never modified;
OUT appears only when complete (written to a hidden temp sibling, fsynced, then renamed).

Example: awqpad pad ./Qwen2-72B-Instruct-AWQ ./Qwen2-72B-AWQ-tp4 --tp 4

Exit codes: 0 written (or nothing to do / already padded), 2 bad input, 3 blocked, 4 output problem."""

OutArg = Annotated[Path, typer.Argument(help="Output directory (must not exist unless --force).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (only after the new output is complete).")]
PushOpt = Annotated[Optional[str], typer.Option("--push-to-hub", metavar="ORG/NAME", show_default=False,
                    help="Upload OUT to this Hub repo after padding (private unless --public; needs HF_TOKEN with write access).")]
FollowOpt = Annotated[bool, typer.Option("--follow-symlinks", help="Also copy side files (tokenizer, code, ...) that are "
                      "symlinks to outside SRC; refused by default, since they would land in OUT (and on the Hub with --push-to-hub).")]
PublicOpt = Annotated[bool, typer.Option("--public", help="With --push-to-hub: create the repo public.")]


def pad(
    src: SrcArg,
    out_dir: OutArg,
    tp: TpOpt,
    engine: EngineOpt = DEFAULT_ENGINE,
    skip_experts: SkipExpertsOpt = False,
    pad_heads: PadHeadsOpt = False,
    expert_parallel: ExpertParallelOpt = False,
    strategy: StrategyOpt = DEFAULT_STRATEGY,
    force: ForceOpt = False,
    follow_symlinks: FollowOpt = False,
    push_repo: PushOpt = None,
    public: PublicOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    check_engine(engine)
    check_strategy(strategy)
    if public and not push_repo:
        raise InputError("--public needs --push-to-hub ORG/NAME")
    if push_repo and (parse_repo_spec(push_repo) is None or "@" in push_repo):
        raise InputError(f"--push-to-hub {push_repo!r}: expected ORG/NAME")
    out = Output(json_out, quiet)
    ckpt = read_checkpoint(resolve_source(src, progress=out.interactive))
    if ckpt.foreign is not None:
        refuse(ckpt.foreign)  # MXFP4 too: the engines already split it at any TP, there is nothing to pad
    plan = plan_with_strategy(ckpt, tuple(tp), engine, skip_experts, pad_heads, expert_parallel, strategy)
    summary = {"source": ckpt.source.source_id, "revision": ckpt.source.revision, "out": None, "tp": list(plan.tp),
               "engine": engine, "plan": plan_summary(plan)}
    if plan.unsupported is not None:
        raise UnsupportedError(f"cannot pad {src}: {plan.unsupported.message}")
    if plan.blocked:
        first = plan.blockers[0]
        more = f" (+{len(plan.blockers) - 1} more; see `awqpad plan`)" if len(plan.blockers) > 1 else ""
        raise BlockedError(f"cannot pad {src} for TP {max(plan.tp)} on {first.engine}: {first.explanation or first.message}{more}")
    if not plan.needs_padding:
        already = (ckpt.source.root / PROVENANCE).is_file()
        status = "already padded" if already else "nothing to do"
        summary["status"] = status
        message = (f"{status}: {src} already loads at TP {', '.join(map(str, plan.tp))} under {engine} rules; nothing written")
        if push_repo:
            out.warn("nothing written, so nothing pushed")
        out.result(summary, lambda console: console.print(message))
        return
    for finding in ckpt.findings:  # e.g. a config.json width smaller than the tensors, which pad rewrites
        if finding.level != "info":
            out.warn(finding.message)
    for warning in plan.warnings:
        out.warn(warning)
    total = sum(s.file_size for s in ckpt.shards) + plan.added_bytes
    with out.progress(total, "padding") as advance:
        result = pad_to_directory(ckpt, plan, out_dir, force=force, follow_symlinks=follow_symlinks, progress=advance,
                                  notify=out.info)
    if result.external_files:
        where = f"; --push-to-hub uploads them to {push_repo}" if push_repo else ""
        out.warn(f"copied {len(result.external_files)} file(s) from outside SRC ({', '.join(result.external_files[:3])}"
                 f"{', ...' if len(result.external_files) > 3 else ''}) because of --follow-symlinks{where}")
    summary.update(status="padded", out=result.out, shards=list(result.shards), bytes_written=result.bytes_written,
                   seconds=round(result.seconds, 3), padded_tensors=result.padded_tensors,
                   copied_files=list(result.copied_files), skipped_files=list(result.skipped_files),
                   external_files=list(result.external_files))
    if push_repo:
        summary["pushed"] = push_to_hub(Path(result.out), push_repo, private=not public, source_id=ckpt.source.source_id,
                                        source_revision=ckpt.source.revision, source_hub=ckpt.source.is_hub,
                                        progress=out.interactive)

    def render(console: Console) -> None:
        dims = ", ".join([f"{d.config_key or d.kind} {d.original} -> {d.padded}" for d in plan.changed_dims]
                         + ([f"heads {plan.heads.heads} -> {plan.heads.new_heads}"] if plan.heads else []))
        if plan.regroup is not None:
            regrouped = f"regrouped group_size {plan.regroup.group_size} -> {plan.regroup.new_group_size}"
            dims = f"{dims} and {regrouped}" if dims else regrouped
        console.print(f"{'' if plan.regroup is not None and not plan.changed_dims else 'padded '}{dims}: {result.padded_tensors} tensors in {len(result.shards)} shard(s), "
                      f"{human_bytes(result.bytes_written)} in {result.seconds:.1f} s -> {result.out}")
        for name in result.skipped_files:
            console.print(f"  skipped {name} (non-safetensors weights would be stale copies)")
        if summary.get("pushed"):
            console.print(f"pushed -> {summary['pushed']}")
        console.print(f"next: awqpad verify {src} {result.out}")
        console.print(f"      {serve_command(engine, result.out, max(plan.tp), plan.expert_parallel)}")

    out.result(summary, render)
