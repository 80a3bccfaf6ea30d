"""The `awqpad` command: wiring only. Each command lives in its own module."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from awqpad import __version__
from awqpad.errors import AwqpadError

HELP = """Make quantized Hugging Face checkpoints load at the tensor-parallel size you have,
by appending exact zero padding (AWQ-GEMM, GPTQ, compressed-tensors, fp16/bf16).

\b
Examples:
  awqpad inspect ./Qwen2-72B-Instruct-AWQ
  awqpad plan ./Qwen2-72B-Instruct-AWQ --tp 4
  awqpad pad ./Qwen2-72B-Instruct-AWQ ./Qwen2-72B-AWQ-tp4 --tp 4
  awqpad verify ./Qwen2-72B-Instruct-AWQ ./Qwen2-72B-AWQ-tp4 --tp 4

\b
Exit codes: 0 ok, 1 verify failed, 2 bad input or usage, 3 blocked (padding cannot reach that TP),
4 output problem (OUT exists, disk full, interrupted), 70 internal error.
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"awqpad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """awqpad: exact zero-padding of quantized checkpoints for tensor parallelism."""


def _register() -> None:
    from awqpad.cli import inspect_cmd, pad_cmd, plan_cmd, verify_cmd

    app.command("inspect", help=inspect_cmd.HELP, no_args_is_help=True)(inspect_cmd.inspect)
    app.command("plan", help=plan_cmd.HELP, no_args_is_help=True)(plan_cmd.plan)
    app.command("pad", help=pad_cmd.HELP, no_args_is_help=True)(pad_cmd.pad)
    app.command("verify", help=verify_cmd.HELP, no_args_is_help=True)(verify_cmd.verify)


_register()


def main() -> None:
    # standalone_mode=False: click hands every outcome back here, so one table decides what users see.
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: the framework's message, on one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # `awqpad pad` alone: the help text is the answer
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        print(f"awqpad: error: {message}{where}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        print("awqpad: interrupted", file=sys.stderr)
        sys.exit(130)
    except AwqpadError as exc:
        message = f"awqpad: error: {exc.message}"
        if exc.hint:
            message += f" (hint: {exc.hint})"
        print(message, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("awqpad: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line unless debugging
        if os.environ.get("AWQPAD_DEBUG"):
            traceback.print_exc()
        print(f"awqpad: internal error: {exc.__class__.__name__}: {exc} (set AWQPAD_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(70)
    if code == 130:  # the framework turns Ctrl-C into exit code 130 without a word
        print("awqpad: interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
