"""Test-session hooks. The default suite needs no torch; the oracle tests (tests/oracle_env.py) skip without
it, and this prints one line, not one per test, saying how to run them."""

from __future__ import annotations

try:
    from tests.oracle_env import HOW_TO_RUN
except ImportError:  # pragma: no cover - run from inside tests/
    from oracle_env import HOW_TO_RUN


def _oracle_skips(terminalreporter) -> int:
    n = 0
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        n += HOW_TO_RUN in reason
    return n


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = _oracle_skips(terminalreporter)
    if n:
        terminalreporter.write_line(
            f"oracle tests skipped ({n}): torch and the third-party reference code are not installed; "
            f"to run them: {HOW_TO_RUN}")
