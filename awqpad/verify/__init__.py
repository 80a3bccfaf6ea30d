"""Stage 6, verify: proving an OUT is what `pad` claims (structure and provenance, bytes, fills and
dequantized zeros, the fp64 TP-sharded MLP and attention simulations), as a list of independent checks."""

from awqpad.verify.context import Check, VerifyReport
from awqpad.verify.runner import verify_output
from awqpad.verify.structure import PROVENANCE

__all__ = ["Check", "PROVENANCE", "VerifyReport", "verify_output"]

from awqpad.lazy import make_callable

make_callable(__name__)  # `awqpad.verify(...)` is the API function (see awqpad/__init__.py)
