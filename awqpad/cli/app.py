"""The typer app: the root options and one command per module. Importing it stays cheap: the command
modules import the pipeline (numpy, rich, huggingface_hub) inside the commands, not at the top."""

from __future__ import annotations

import typer

from awqpad import __version__

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
4 output problem (OUT exists, disk full, interrupted, Hub upload refused), 70 internal error.
With --json, errors are one JSON object on stdout too: {"error": {"code": N, "message": "..."}}.
"""

def _plain_metavars() -> None:
    """Help shows `SRC`, not typer 0.2x's `{src}` in the usage line and `SRC <str>` under Arguments:
    arguments print their metavar as given (typer's own class, where it has these hooks)."""
    from typer.core import TyperArgument

    if not hasattr(TyperArgument, "_usage_display_name") or getattr(TyperArgument, "_awqpad_plain", False):
        return
    display_type = TyperArgument.display_type

    def usage_name(self) -> str:
        name = self.metavar or self.name.upper()
        if " " in name or name.startswith("["):
            return name  # already written the way it reads, e.g. "[SRC] OUT"
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    TyperArgument._usage_display_name = usage_name
    TyperArgument.display_type = lambda self, ctx: "" if self.metavar else display_type(self, ctx)
    TyperArgument._awqpad_plain = True


def _light_coercion() -> None:
    """typer 0.2x converts every non-flag value through a pydantic TypeAdapter, and importing pydantic costs
    ~0.2 s, more than the rest of `awqpad inspect`. Our parameters are plain str / int / Path (or lists
    and Optionals of them), so convert those directly; anything else keeps typer's own conversion."""
    import dataclasses
    import types
    from pathlib import Path
    from typing import Any, Union, get_args, get_origin

    try:
        from typer import _coercion, core
    except ImportError:
        return
    base, param_cls = getattr(_coercion, "RuntimeParam", None), getattr(core, "_TyperParameter", None)
    if base is None or param_cls is None or not hasattr(param_cls, "get_runtime_param") or \
            getattr(param_cls, "_awqpad_light", False):
        return

    def plain_type(annotation: Any):
        origin, args = get_origin(annotation), get_args(annotation)
        if origin in (Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            return plain_type(rest[0]) if len(rest) == 1 else None
        if origin is list and len(args) == 1:
            return plain_type(args[0])
        return annotation if annotation in (str, int, Path, bool) else None

    @dataclasses.dataclass(frozen=True)
    class Plain(base):
        convert: Any = str

        def _coerce_value(self, value, param, ctx):
            if isinstance(value, (list, tuple)):
                return [self._one(v, param, ctx) for v in value]
            return self._one(value, param, ctx)

        def _one(self, value, param, ctx):
            if isinstance(value, self.convert):
                return value
            if self.convert is bool:  # flags: click hands over bools (or None); anything else is not ours
                raise typer.BadParameter(f"{value!r} is not a flag value", ctx=ctx, param=param)
            try:
                return self.convert(value)
            except (TypeError, ValueError):
                raise typer.BadParameter(f"{value!r} is not a valid {self.convert.__name__}", ctx=ctx, param=param) from None

    original = param_cls.get_runtime_param

    def get_runtime_param(self):
        desc = self.type_descriptor
        if self._runtime_param is None and desc.file_annotation is None and not getattr(desc, "is_ranged", False) \
                and not getattr(desc, "is_choice", False):
            kind = plain_type(desc.annotation)
            if kind is not None:
                self._runtime_param = Plain(parameter_info=desc.parameter_info, annotation=desc.annotation, convert=kind)
        return original(self)

    param_cls.get_runtime_param = get_runtime_param
    param_cls._awqpad_light = True


_plain_metavars()
_light_coercion()

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
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
    from awqpad.cli import cache_cmd, inspect_cmd, pad_cmd, plan_cmd, push_cmd, verify_cmd

    app.command("inspect", help=inspect_cmd.HELP, no_args_is_help=True)(inspect_cmd.inspect)
    app.command("plan", help=plan_cmd.HELP, no_args_is_help=True)(plan_cmd.plan)
    app.command("pad", help=pad_cmd.HELP, no_args_is_help=True)(pad_cmd.pad)
    app.command("verify", help=verify_cmd.HELP, no_args_is_help=True)(verify_cmd.verify)
    app.command("push", help=push_cmd.HELP, no_args_is_help=True)(push_cmd.push)
    app.add_typer(cache_cmd.app, name="cache", help=cache_cmd.HELP)


_register()
