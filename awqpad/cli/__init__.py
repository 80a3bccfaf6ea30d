"""The `awqpad` command: the entry point and its one error table. Commands are wired in cli/app.py.

Start-up matters (a shell step before every launch): `--version` answers before typer is imported, and
no command module imports numpy, rich or huggingface_hub until the command runs.
"""

from __future__ import annotations

import json
import os
import sys

from awqpad import __version__
from awqpad.errors import AwqpadError


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def _fail(code: int, message: str, json_mode: bool, data: dict | None = None, kind: str = "error") -> None:
    """`awqpad: <kind>: message` on stderr; with --json also one object on stdout:
    {"error": {"code": N, "message": "..."}} (after the data the command would have printed, if any)."""
    print(f"awqpad: {kind}: {message}" if kind else f"awqpad: {message}", file=sys.stderr)
    if json_mode:
        payload = {**(data or {}), "error": {"code": code, "message": message}}
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()
    sys.exit(code)


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print(f"awqpad {__version__}")
        sys.exit(0)
    json_mode = _wants_json(argv)
    import typer

    from awqpad.cli.app import app

    # standalone_mode=False: click hands every outcome back here, so one table decides what users see.
    try:
        code = app(args=argv, prog_name="awqpad", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: the framework's message, on one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # `awqpad pad` alone: the help text is the answer
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        _fail(getattr(exc, "exit_code", 2), f"{message}{where}", json_mode)
    except typer.Abort:
        _fail(130, "interrupted", json_mode, kind="")
    except AwqpadError as exc:
        message = exc.message
        if exc.hint:
            message += f" (hint: {exc.hint})"
        _fail(exc.exit_code, message, json_mode, getattr(exc, "data", None))
    except KeyboardInterrupt:
        _fail(130, "interrupted", json_mode, kind="")
    except Exception as exc:  # a bug: say so in one line unless debugging
        if os.environ.get("AWQPAD_DEBUG"):
            import traceback

            traceback.print_exc()
        _fail(70, f"{exc.__class__.__name__}: {exc} (set AWQPAD_DEBUG=1 for a traceback)", json_mode,
              kind="internal error")
    if code == 130:  # the framework turns Ctrl-C into exit code 130 without a word
        _fail(130, "interrupted", json_mode, kind="")
    sys.exit(code if isinstance(code, int) else 0)
