"""The README's set-up commands are what CI runs, and the test command cannot pull torch."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
CI_RUN = (REPO / ".ci" / "run").read_text()


def setup_commands() -> list[str]:
    section = README[README.index("## Set up\n"):README.index("\n## ", README.index("## Set up\n") + 1)]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    example, tests, *oracle = setup_commands()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert example.startswith(venv) and "python -m awqpad.example " in example and "awqpad verify " in example
    assert tests.startswith(venv) and tests.endswith("python -m pytest -q")
    assert len(oracle) == 1 and "bash .ci/oracles.sh" in oracle[0]  # optional, after the two set-up commands
    assert "Python >= 3.10" in README
    (ci_test,) = re.findall(r"^README_TEST='(.*)'$", CI_RUN, re.M)
    assert ci_test == tests
    assert 'bash -c "$README_TEST"' in CI_RUN
    for step in ("bash .ci/oracles.sh", "-m pytest -q -m oracle", "bash scripts/e2e_vllm_cpu.sh"):
        assert step in CI_RUN, step
    assert subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")]).returncode == 0


def test_test_extra_needs_no_torch():
    text = (REPO / "pyproject.toml").read_text()
    (test_extra,) = re.findall(r"^test = \[(.*)\]$", text, re.M)
    assert test_extra and "torch" not in test_extra
    (deps,) = re.findall(r"^dependencies = \[(.*?)\]", text, re.M | re.S)
    assert "torch" not in deps
    assert "torch" not in _tests_command() and "torch" not in setup_commands()[0]


def _tests_command() -> str:
    return setup_commands()[1]
