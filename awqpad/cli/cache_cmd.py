"""`awqpad cache ls|clear`: the safetensors-header cache that `inspect` / `plan` keep for repo ids."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from awqpad.cli.options import CacheDirOpt, JsonOpt, QuietOpt
from awqpad.cli.output import Output, esc

HELP = """Show or empty the header cache of `inspect` / `plan` on repo ids: each shard's safetensors header,
kept per repo and commit inside the repo's folder of the Hub cache (HF_HUB_CACHE/models--ORG--NAME/
awqpad-headers/), as sparse files (no blocks for the tensor data). Bounded by AWQPAD_HEADER_CACHE_MB
(default 256): the least recently used entries are pruned. `hf cache rm` of a repo removes them too."""

app = typer.Typer(no_args_is_help=True, help=HELP)
RepoOpt = Annotated[Optional[str], typer.Argument(metavar="[ORG/NAME]", show_default=False,
                                                 help="Only this repo's entries (default: all).")]


def _table(entries, console) -> None:
    from rich.table import Table

    from awqpad.cli.inspect_cmd import human_bytes
    from awqpad.source.header_cache import age, limit_bytes

    table = Table(title_justify="left", title="awqpad header cache")
    for col in ("repo", "commit", "on disk", "describes", "last used"):
        table.add_column(col, justify="right" if col in ("on disk", "describes") else "left", no_wrap=col != "repo")
    for e in entries:
        table.add_row(esc(e.repo_id), esc(e.commit[:12]), human_bytes(e.bytes_on_disk), human_bytes(e.apparent_bytes),
                      age(e.last_used))
    console.print(table)
    total = sum(e.bytes_on_disk for e in entries)
    console.print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)} on disk "
                  f"(limit {human_bytes(limit_bytes())}, AWQPAD_HEADER_CACHE_MB)")


@app.command("ls", help="List the cached headers: repo, commit, real size, the size they describe, last use.")
def ls(repo_id: RepoOpt = None, cache_dir: CacheDirOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    from awqpad.source.header_cache import cache_root, entries
    from awqpad.source.hub_settings import hub_settings

    out = Output(json_out, quiet)
    with hub_settings(cache_dir=cache_dir):
        found = [e for e in entries() if repo_id is None or e.repo_id == repo_id]
        root = str(cache_root())
    out.result({"cache_dir": root, "entries": found}, lambda console: _table(found, console))


@app.command("clear", help="Remove cached headers (of one repo if given); the next inspect/plan fetches them again.")
def clear(repo_id: RepoOpt = None, cache_dir: CacheDirOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    from awqpad.cli.inspect_cmd import human_bytes
    from awqpad.source import header_cache
    from awqpad.source.hub_settings import hub_settings

    out = Output(json_out, quiet)
    with hub_settings(cache_dir=cache_dir):
        removed = header_cache.clear(repo_id)
    freed = sum(e.bytes_on_disk for e in removed)
    out.result({"removed": removed, "freed_bytes": freed},
               lambda console: console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
                                             f"freed {human_bytes(freed)}"))
