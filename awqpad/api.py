"""The Python API: `from awqpad import inspect, plan, pad, verify`.

Each function does what the command of the same name does and returns the dataclass its `--json`
output serialises (`awqpad.serialize.to_data(result)`; for `plan`, `awqpad.plan_summary(result)`).
Failures raise the typed errors of `awqpad.errors`, whose `exit_code` is the CLI's exit code. Nothing is
printed; `progress` (a callable `progress(total_bytes, description)` returning a context manager that
yields `advance(nbytes)`) and `notify` (a callable taking one message) are the only side channels.

The top of the pipeline: it imports every stage, so nothing below imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from awqpad.engines.profiles import DEFAULT_ENGINE, ENGINE_CHOICES, check_engine
from awqpad.errors import BlockedError, InputError, OutputError, UnsupportedError
from awqpad.source.hub_settings import hub_settings
from awqpad.source.spec import parse_repo_spec

Notify = Callable[[str], None]


@dataclass(frozen=True)
class PadOutcome:
    """What `pad` did (the `--json` object of `awqpad pad`)."""

    status: str  # "padded" | "nothing to do" | "already padded"
    source: str
    revision: str | None
    out: str
    tp: tuple[int, ...]
    engine: str
    plan: dict  # plan_summary of the plan that was executed
    shards: tuple[str, ...]
    bytes_written: int
    seconds: float
    padded_tensors: int
    copied_files: tuple[str, ...]
    skipped_files: tuple[str, ...]
    external_files: tuple[str, ...] = ()  # side files from outside SRC (--follow-symlinks)
    linked_files: tuple[str, ...] = ()  # hard links to SRC (nothing to pad, same filesystem)
    launch: tuple[str, ...] = ()  # the launch line of every engine the plan was made for
    pushed: str | None = None  # repo URL after --push-to-hub
    warnings: tuple[str, ...] = field(default=())


def source_spec(src: str, revision: str | None) -> str:
    """SRC plus --revision -> the `org/name@rev` spec resolve_source takes."""
    if not revision:
        return src
    if Path(src).expanduser().exists() or parse_repo_spec(src) is None:
        raise InputError(f"--revision {revision!r}: {src} is not a Hub repo id (a revision applies to org/name only)")
    repo, given = parse_repo_spec(src)
    if given and given != revision:
        raise InputError(f"{src}: names revision {given!r} but --revision says {revision!r}")
    return f"{repo}@{revision}"


def _resolve(src: str, revision: str | None, headers_only: bool, progress_bars: bool | None):
    from awqpad.source import resolve_source

    return resolve_source(source_spec(src, revision), headers_only=headers_only, progress=progress_bars)


def _tps(tp: int | Sequence[int]) -> tuple[int, ...]:
    tps = (tp,) if isinstance(tp, int) else tuple(tp)
    if not tps or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tps):
        raise InputError(f"tp: expected positive integers, got {tp!r}")
    return tuple(sorted(set(tps)))


def inspect(src: str, *, engine: str = DEFAULT_ENGINE, revision: str | None = None, token: str | None = None,
            cache_dir: str | None = None, progress_bars: bool | None = False):
    """Describe SRC (a directory or Hub repo id; headers only) -> `InspectReport`."""
    import dataclasses

    from awqpad.checkpoint.model import read_checkpoint
    from awqpad.plan.inspect_report import inspect_report

    check_engine(engine)
    with hub_settings(token, cache_dir):
        source = _resolve(src, revision, True, progress_bars)
        report = inspect_report(read_checkpoint(source), engine)
    if source.is_hub:
        report = dataclasses.replace(report, fetched_bytes=source.fetched_bytes)
    return report


def plan_with_source(src, tp, *, engine=DEFAULT_ENGINE, skip_experts=False, pad_heads=False, expert_parallel=False,
                     strategy="auto", revision=None, token=None, cache_dir=None, headers_only=True, progress_bars=False,
                     refuse_foreign=False):
    """(PadPlan, Source, Checkpoint): `plan` plus what the CLI reports about the source. `refuse_foreign`
    (pad): a quantization awqpad only recognises (MXFP4, bitsandbytes, GGUF, ...) raises instead."""
    from awqpad.checkpoint.model import read_checkpoint
    from awqpad.plan.strategy import check_strategy, plan_with_strategy

    check_engine(engine)
    check_strategy(strategy)
    with hub_settings(token, cache_dir):
        source = _resolve(src, revision, headers_only, progress_bars)
        ckpt = read_checkpoint(source)
    if refuse_foreign and ckpt.foreign is not None:
        from awqpad.checkpoint.foreign import refuse

        refuse(ckpt.foreign)  # MXFP4 too: the engines already split it at any TP, there is nothing to pad
    return plan_with_strategy(ckpt, _tps(tp), engine, skip_experts, pad_heads, expert_parallel, strategy), source, ckpt


def plan(src: str, tp: int | Sequence[int], *, engine: str = DEFAULT_ENGINE, skip_experts: bool = False,
         pad_heads: bool = False, expert_parallel: bool = False, strategy: str = "auto", revision: str | None = None,
         token: str | None = None, cache_dir: str | None = None):
    """What padding TP size(s) `tp` need under `engine` rules (headers only) -> `PadPlan`. A blocked plan is
    returned, not raised (`plan.blocked`, `plan.blockers`); `awqpad.plan_summary(p)` is the `--json` object."""
    return plan_with_source(src, tp, engine=engine, skip_experts=skip_experts, pad_heads=pad_heads,
                            expert_parallel=expert_parallel, strategy=strategy, revision=revision, token=token,
                            cache_dir=cache_dir)[0]


def _check_push_repo(repo_id: str | None, public: bool) -> None:
    if public and not repo_id:
        raise InputError("--public needs --push-to-hub ORG/NAME")
    if repo_id and (parse_repo_spec(repo_id) is None or "@" in repo_id):
        raise InputError(f"--push-to-hub {repo_id!r}: expected ORG/NAME")


def pad(src: str, out: str | Path, tp: int | Sequence[int], *, engine: str = DEFAULT_ENGINE, skip_experts: bool = False,
        pad_heads: bool = False, expert_parallel: bool = False, strategy: str = "auto", force: bool = False,
        push_to_hub: str | None = None,
        public: bool = False, follow_symlinks: bool = False,
        revision: str | None = None, token: str | None = None, cache_dir: str | None = None,
        progress=None, notify: Notify = lambda message: None, progress_bars: bool | None = False) -> PadOutcome:
    """Write OUT, a copy of SRC that loads at `tp`, and return a `PadOutcome`. OUT is always produced: when
    nothing needs padding its files are hard links to SRC (copies across filesystems). With `push_to_hub`,
    the token, the Hub and the right to write the repo are checked before anything is downloaded or written.
    Raises BlockedError (exit 3; `.data` holds the plan summary) when padding cannot reach `tp`."""
    from awqpad.engines.launch import launch_lines
    from awqpad.execute.link_repo import link_to_directory
    from awqpad.execute.output_repo import PROVENANCE, pad_to_directory
    from awqpad.checkpoint.foreign import refuse
    from awqpad.plan.summary import plan_summary

    check_engine(engine)
    _check_push_repo(push_to_hub, public)
    out = Path(out)
    with hub_settings(token, cache_dir):
        if push_to_hub:
            from awqpad.source.push import check_push_access

            check_push_access(push_to_hub)
        result, source, ckpt = plan_with_source(src, tp, engine=engine, skip_experts=skip_experts, pad_heads=pad_heads,
                                                expert_parallel=expert_parallel, strategy=strategy, revision=revision,
                                                headers_only=False,
                                                progress_bars=progress_bars)
        if ckpt.foreign is not None:
            refuse(ckpt.foreign)  # MXFP4 too: the engines already split it at any TP, there is nothing to pad
        summary = plan_summary(result)
        if result.unsupported is not None:
            raise UnsupportedError(f"cannot pad {src}: {result.unsupported.message}")
        if result.blocked:
            first = result.blockers[0]
            more = f" (+{len(result.blockers) - 1} more; see `awqpad plan`)" if len(result.blockers) > 1 else ""
            from awqpad.plan.strategy import AUTO_NO_REFINE

            refine = any(c.rejected == AUTO_NO_REFINE for c in result.candidates)
            error = BlockedError(f"cannot pad {src} for TP {max(result.tp)} on {first.engine}: "
                                 f"{first.explanation or first.message}{more}",
                                 hint="--strategy regroup refines the FP8 blocks instead: weights exact, activations "
                                      "quantized in finer groups" if refine else None)
            error.data = {"status": "blocked", "source": ckpt.source.source_id, "revision": ckpt.source.revision,
                          "out": None, "tp": list(result.tp), "engine": engine, "plan": summary}
            raise error
        model = push_to_hub or f"./{out.name}"
        warnings = [f.message for f in ckpt.findings if f.level != "info"]  # e.g. a config width pad rewrites
        warnings += result.warnings
        if result.needs_padding:
            total = sum(s.file_size for s in ckpt.shards) + result.added_bytes
            with (progress or _no_progress)(total, "padding") as advance:
                written = pad_to_directory(ckpt, result, out, force=force, follow_symlinks=follow_symlinks,
                                           progress=advance, notify=notify, model=model)
            status, linked = "padded", ()
        else:
            status = "already padded" if (ckpt.source.root / PROVENANCE).is_file() else "nothing to do"
            written, linked = link_to_directory(ckpt, result, out, status=status, force=force,
                                                follow_symlinks=follow_symlinks, notify=notify)
        external = tuple(getattr(written, "external_files", ()))
        if external:
            where = f"; --push-to-hub uploads them to {push_to_hub}" if push_to_hub else ""
            warnings.append(f"copied {len(external)} file(s) from outside SRC ({', '.join(external[:3])}"
                            f"{', ...' if len(external) > 3 else ''}) because of --follow-symlinks{where}")
        outcome = PadOutcome(
            status=status, source=ckpt.source.source_id, revision=ckpt.source.revision, out=written.out,
            tp=result.tp, engine=engine, plan=summary, shards=written.shards, bytes_written=written.bytes_written,
            seconds=round(written.seconds, 3), padded_tensors=written.padded_tensors,
            copied_files=written.copied_files, skipped_files=written.skipped_files, linked_files=tuple(linked),
            external_files=external,
            launch=launch_lines(result.engines, push_to_hub or str(out), max(result.tp), result.expert_parallel),
            warnings=tuple(warnings))
        if push_to_hub:
            outcome = _push_after_pad(outcome, push_to_hub, public, ckpt, progress_bars)
    return outcome


def _push_after_pad(outcome: PadOutcome, repo_id: str, public: bool, ckpt, progress_bars) -> PadOutcome:
    import dataclasses

    from awqpad.source.push import push_to_hub

    try:
        url = push_to_hub(Path(outcome.out), repo_id, private=not public, source_id=ckpt.source.source_id,
                          source_revision=ckpt.source.revision, source_hub=ckpt.source.is_hub, progress=progress_bars,
                          card_rewrite=_card_rewrite(Path(outcome.out), repo_id))
    except OutputError as exc:
        raise OutputError(exc.message, hint=f"{outcome.out} is complete; retry the upload with "
                                            f"`awqpad push {outcome.out} {repo_id}`") from None
    return dataclasses.replace(outcome, pushed=url)


def push(out: str | Path, repo_id: str, *, public: bool = False, token: str | None = None,
         progress_bars: bool | None = False) -> str:
    """Upload a finished OUT to `repo_id` (resumable: files already on the Hub are not sent again) -> URL."""
    from awqpad.source.push import check_push_access, push_to_hub

    with hub_settings(token):
        check_push_access(repo_id)
        return push_to_hub(Path(out), repo_id, private=not public, progress=progress_bars,
                           card_rewrite=_card_rewrite(Path(out), repo_id))


def _card_rewrite(out_dir: Path, repo_id: str) -> dict[str, str]:
    """The card's launch lines as `pad` wrote them (serving ./OUT-name) -> the same lines serving `repo_id`."""
    from awqpad.engines.launch import launch_lines
    from awqpad.execute.output_repo import PROVENANCE

    recorded = _recorded(out_dir, PROVENANCE)
    summary = recorded.get("plan") if isinstance(recorded.get("plan"), dict) else {}
    engines = [e for e in summary.get("engines") or () if isinstance(e, str)]
    tps = [t for t in recorded.get("tp") or () if isinstance(t, int) and not isinstance(t, bool)]
    if not engines or not tps:
        return {}
    ep = recorded.get("expert_parallel") is True
    return dict(zip(launch_lines(engines, f"./{out_dir.name}", max(tps), ep), launch_lines(engines, repo_id, max(tps), ep)))


def verify(out: str, src: str | None = None, *, tp: int | Sequence[int] | None = None, engine: str | None = None,
           layers: str = "sample", seed: int = 0, token: str | None = None, cache_dir: str | None = None,
           progress=None, progress_bars: bool | None = False):
    """Check OUT (and against SRC when given) -> `VerifyReport` (`report.passed`). `tp` and `engine` default to
    what OUT's awqpad.json records. A failed check is a report with `passed=False`, not an exception."""
    from awqpad.source import resolve_source
    from awqpad.verify import PROVENANCE, verify_output

    with hub_settings(token, cache_dir):
        out_source = resolve_source(str(out), progress=progress_bars)
        src_source = resolve_source(str(src), progress=progress_bars) if src is not None else None
        recorded = _recorded(out_source.root, PROVENANCE)
        tps = _tps(tp) if tp is not None else tuple(t for t in recorded.get("tp") or () if isinstance(t, int))
        if not tps:
            raise InputError(f"--tp is required: {out} has no usable {PROVENANCE} recording the TP size")
        engine = engine or (recorded.get("engine") if recorded.get("engine") in ENGINE_CHOICES else DEFAULT_ENGINE)
        return verify_output(out_source, tps, engine, src_source, layers, seed, progress=progress)


def _recorded(out_dir: Path, name: str) -> dict:
    """awqpad.json's defaults for --tp / --engine; {} if it is missing or unusable (the provenance check says why)."""
    from awqpad.source import bounded_json

    try:
        data = bounded_json.read(Path(out_dir) / name, "provenance")
        return data if isinstance(data, dict) else {}
    except InputError:
        return {}


def _no_progress(total: int, description: str):
    from contextlib import nullcontext

    return nullcontext(lambda n: None)
