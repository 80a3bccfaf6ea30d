"""The engine profiles: name -> its rules (engines/vllm.py, sglang.py, others.py; Rule in rules.py).

Every rule is keyed by engine (the profile) x quantization format (Rule.formats) x kernel path
(Rule.path, fast kernel vs fallback vs refused: Rule.severity), with the message that path prints and the
engine source it mirrors (../shared/reference/engine-constraints.md has the reading).
"""

from __future__ import annotations

from types import MappingProxyType

from awqpad.engines.others import LMDEPLOY, LMDEPLOY_NOTE, TGI, TRTLLM
from awqpad.engines.rules import Rule
from awqpad.engines.sglang import SGLANG
from awqpad.engines.vllm import VLLM, VLLM_LATEST

ENGINES = MappingProxyType(
    {"vllm": VLLM, "vllm-latest": VLLM_LATEST, "sglang": SGLANG, "tgi": TGI, "lmdeploy": LMDEPLOY, "trtllm": TRTLLM}
)
ENGINE_NOTES = MappingProxyType({"lmdeploy": LMDEPLOY_NOTE})
DEFAULT_ENGINE = "vllm"
ENGINE_CHOICES = tuple(ENGINES) + ("all",)

__all__ = ["ENGINES", "ENGINE_NOTES", "DEFAULT_ENGINE", "ENGINE_CHOICES", "Rule", "engines_for", "check_engine", "rules_for"]


def engines_for(selection: str) -> tuple[str, ...]:
    return tuple(ENGINES) if selection == "all" else (selection,)


def rules_for(engine: str, fmt: str | None) -> tuple[Rule, ...]:
    """The rows of `engine` that speak about checkpoints of format `fmt`."""
    return tuple(r for r in ENGINES[engine] if r.covers(fmt))


def check_engine(selection: str) -> str:
    """`selection` if it names a profile (or "all"); otherwise the one-line usage error."""
    from awqpad.errors import InputError

    if selection not in ENGINE_CHOICES:
        raise InputError(f"--engine {selection!r} is not one of {', '.join(ENGINE_CHOICES)}")
    return selection
