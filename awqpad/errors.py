"""One exception tree; each class carries the exit code scripts rely on.

Exit codes (documented in the README and in `--help`):
  0  success (including "already padded" / "nothing to do")
  1  a verify check failed
  2  bad usage, or a bad / inconsistent / unsupported input checkpoint
  3  blocked: the requested TP cannot be reached by padding
  4  output problem: OUT exists, disk full, interrupted write
  70 internal error (a bug; traceback with AWQPAD_DEBUG=1)
"""

from __future__ import annotations


class AwqpadError(Exception):
    exit_code = 2
    data: dict | None = None  # what the command would have printed with --json (e.g. a blocked plan)

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(AwqpadError):
    """The source checkpoint is missing, malformed or inconsistent."""


class UnsupportedError(AwqpadError):
    """The checkpoint is well-formed but uses something awqpad cannot pad exactly (a quantization method,
    layout or bit width it does not pad, including methods `inspect` recognises but `pad` does not).

    Exit 2, not 3, by decision: 3 means "this checkpoint, at this TP, cannot be padded by any plan";
    an unsupported format is a property of the input whatever the TP, so it is a bad input."""

    exit_code = 2


class BlockedError(AwqpadError):
    """The requested TP size cannot be reached by padding."""

    exit_code = 3


class OutputError(AwqpadError):
    """Writing the output failed or was refused."""

    exit_code = 4


class VerifyFailed(AwqpadError):
    exit_code = 1
