"""`awqpad push OUT ORG/NAME`: upload a finished OUT (the retry after a failed `pad --push-to-hub`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awqpad.cli.options import JsonOpt, QuietOpt, TokenOpt
from awqpad.cli.output import Output, esc

HELP = """Upload a padded OUT to a Hub repo: private unless --public, the source linked in the model card, the
launch lines naming the repo. Resumable: files the repo already holds are not sent again, each shard is
its own commit and the small files go last, so after an interruption run the same command again.

Example: awqpad push ./Qwen2-72B-AWQ-tp4 me/Qwen2-72B-AWQ-tp4

Exit codes: 0 uploaded, 2 bad input (OUT not a padded repo, bad repo id), 4 the Hub refused or was unreachable."""

OutArg = Annotated[Path, typer.Argument(metavar="OUT", help="A directory written by `awqpad pad`.", show_default=False)]
RepoArg = Annotated[str, typer.Argument(metavar="ORG/NAME", help="The Hub repo to create or update.", show_default=False)]
PublicOpt = Annotated[bool, typer.Option("--public", help="Create the repo public (an existing repo keeps its visibility).")]


def push(out_dir: OutArg, repo_id: RepoArg, public: PublicOpt = False, token: TokenOpt = None,
         json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    from awqpad import api

    out = Output(json_out, quiet)
    url = api.push(out_dir, repo_id, public=public, token=token, progress_bars=out.interactive)
    out.result({"out": str(out_dir), "repo_id": repo_id, "pushed": url},
               lambda console: console.print(f"pushed {esc(out_dir)} -> {esc(url)}"))
