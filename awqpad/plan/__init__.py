"""Stage 4, plan: what to change, computed without touching a byte (MLP / expert widths, head padding, the
inspect report). Hands `execute` a serializable `PadPlan` of tensor ops and config updates."""

from awqpad.lazy import make_callable

make_callable(__name__)  # `awqpad.plan(...)` is the API function (see awqpad/__init__.py)
