"""The default test suite runs without torch; the oracle tests say, in one line, how to run them; CI fails
instead of skipping them. Each check runs pytest or the factory in a child python whose `import torch` fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.factory import encode_header, write_safetensors
from tests.oracle_env import HOW_TO_RUN

REPO = Path(__file__).resolve().parent.parent
NO_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` now raises ImportError\n"


def run_without_torch(code: str, env_ci: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if env_ci is not None:
        env["CI"] = env_ci
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_factory_needs_no_torch(tmp_path):
    code = f"""
import numpy as np
from tests.factory import Model, Quant, build_checkpoint, dequantize_all, load_tensors
for q in (Quant("ct", sym=False, scale_dtype="BF16"), Quant("gptq", desc_act=True), Quant("bf16")):
    fx = build_checkpoint({str(tmp_path)!r} + "/" + q.method, Model(intermediate=640), q, shards=2)
    t = load_tensors(fx.path)
    got = dequantize_all(t, fx)
    assert got.keys() == fx.weights.keys() and all(np.array_equal(got[k], fx.weights[k]) for k in got)
assert "torch" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
print("ok")
"""
    r = run_without_torch(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_writer_matches_safetensors_byte_for_byte(tmp_path):
    """write_safetensors lays tensors out as safetensors' own save_file does (dtype order, then name)."""
    rng = np.random.default_rng(0)
    arrays = {"b.weight": rng.standard_normal((3, 5)).astype(np.float16), "a.qweight": np.arange(8, dtype=np.int32),
              "z.shape": np.array([4, 2], np.int64), "c.scale": rng.standard_normal(7).astype(np.float32)}
    dt = {np.dtype(np.float16): "F16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
          np.dtype(np.float32): "F32"}
    save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", [(n, dt[a.dtype], a) for n, a in arrays.items()],
                      {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    head, nbytes = encode_header([("x", "BF16", (2, 3))])
    write_safetensors(tmp_path / "bf16.safetensors", [("x", "BF16", np.arange(6, dtype=np.uint16).reshape(2, 3))])
    assert (tmp_path / "bf16.safetensors").read_bytes() == head + np.arange(6, dtype="<u2").tobytes()
    assert nbytes == 12


ORACLE_FILES = ["tests/test_oracles.py", "tests/test_runtime.py", "tests/test_factory.py", "-m", "oracle"]


def _pytest(env_ci: str | None) -> subprocess.CompletedProcess:
    args = ["-q", "-p", "no:cacheprovider", *ORACLE_FILES]
    return run_without_torch(f"import pytest; sys.exit(pytest.main({args!r}))", env_ci)


def test_skipped_oracles_print_one_line_saying_how_to_run_them():
    r = _pytest(None)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if HOW_TO_RUN in ln]
    assert len(lines) == 1 and lines[0].startswith("oracle tests skipped ("), r.stdout
    assert "passed" not in r.stdout.splitlines()[-1], r.stdout  # nothing that needs torch ran


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_oracles_fail_under_ci(ci):
    r = _pytest(ci)
    assert r.returncode in (1, 2), r.stdout + r.stderr  # failed tests (1) or failed collection (2)
    assert "CI is set, so a missing oracle is a failure" in r.stdout, r.stdout
