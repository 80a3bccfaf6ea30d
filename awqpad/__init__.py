"""awqpad: exact zero-padding of quantized checkpoints for tensor parallelism.

Python API (the same dataclasses `--json` prints, the same typed errors the CLI maps to exit codes):

    import awqpad
    report = awqpad.inspect("org/name")                       # InspectReport
    plan = awqpad.plan("./ckpt", tp=[2, 4])                   # PadPlan (plan.blocked, plan.changed_dims)
    outcome = awqpad.pad("./ckpt", "./ckpt-tp4", tp=4)        # PadOutcome
    result = awqpad.verify("./ckpt-tp4", "./ckpt")            # VerifyReport (result.passed)

Importing awqpad is cheap: each function imports the pipeline on first call. `awqpad.plan` and
`awqpad.verify` are also the names of the pipeline's plan/ and verify/ stage packages; those packages are
callable and forward to the API, so `from awqpad import plan, verify` works whatever was imported first.
"""

__version__ = "0.1.0"

from awqpad.errors import AwqpadError, BlockedError, InputError, OutputError, UnsupportedError, VerifyFailed  # noqa: E402

_API = ("inspect", "plan", "pad", "verify", "push", "plan_summary", "PadOutcome")
__all__ = ["__version__", *_API, "AwqpadError", "BlockedError", "InputError", "OutputError", "UnsupportedError",
           "VerifyFailed"]


def __getattr__(name: str):
    if name in ("plan", "verify"):  # the stage packages, made callable by their __init__
        import importlib

        return importlib.import_module(f"awqpad.{name}")
    if name == "plan_summary":
        from awqpad.plan.summary import plan_summary

        return plan_summary
    if name in _API:
        from awqpad import api

        return getattr(api, name)
    raise AttributeError(f"module 'awqpad' has no attribute {name!r}")
