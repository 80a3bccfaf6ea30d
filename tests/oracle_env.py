"""The oracle tests: torch and third-party reference code (AutoAWQ, GPTQModel, AutoGPTQ, compressed-tensors,
transformers) judging awqpad's output. awqpad and the default test suite need none of it.

A missing oracle skips locally, with a reason that names HOW_TO_RUN (tests/conftest.py turns those skips into
one summary line), and is a failure when the CI environment variable is set: CI must never pass by skipping.
"""

from __future__ import annotations

import os

import pytest

HOW_TO_RUN = 'pip install -e ".[oracles]" && bash .ci/oracles.sh && python -m pytest -m oracle'


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, err: BaseException | str, *, module_level: bool = False):
    """Skip (locally) or fail (CI) because oracle `what` is not usable; `err` says why."""
    msg = f"{what} is not available ({err}); to run the oracle tests: {HOW_TO_RUN}"
    if in_ci():
        pytest.fail(f"CI is set, so a missing oracle is a failure: {msg}", pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


def import_torch(*, module_level: bool = False):
    """torch, or a skip/failure saying how to install the oracles."""
    try:
        import torch
    except ImportError as e:
        missing("torch", f"{type(e).__name__}: {e}", module_level=module_level)
    return torch
