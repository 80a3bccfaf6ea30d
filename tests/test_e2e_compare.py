"""The vLLM end-to-end verdict (tests/e2e/vllm_driver.py `compare`): what passes and what must fail.

The driver runs inside the vLLM venv, but `compare` is plain Python over the JSON results, so its rules
are pinned here: identical greedy tokens, first-step log-probs within the tolerance, and a later flip
accepted only as a float16 tie that both runs rank within the tolerance.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("vllm_driver", Path(__file__).parent / "e2e" / "vllm_driver.py")
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


def step(token: int, top: dict[int, float]) -> dict:
    return {"token": token, "logprob": top[token], "top": {str(t): v for t, v in top.items()}}


def result(*prompts: list[dict], tp: int = 1) -> dict:
    return {"tp": tp, "load_s": 1.0, "generate_s": 1.0,
            "prompts": [{"prompt": [5, 6, 7], "tokens": [s["token"] for s in steps], "steps": steps}
                        for steps in prompts]}


REF = result([step(10, {10: -1.0, 11: -2.0}), step(20, {20: -3.000, 21: -3.001}), step(30, {30: -1.0, 31: -4.0})])


def test_identical_runs_pass():
    ok, summary = driver.compare(REF, REF, 0.01)
    assert ok and summary.startswith("tokens identical,")


def test_first_step_log_prob_drift_beyond_tolerance_fails():
    other = result([step(10, {10: -1.05, 11: -2.0}), REF["prompts"][0]["steps"][1], REF["prompts"][0]["steps"][2]])
    ok, summary = driver.compare(REF, other, 0.01)
    assert not ok and "first-step log-prob diff 0.0500" in summary


def test_a_later_flip_between_tied_tokens_passes_and_stops_the_comparison():
    # step 1: the reference prefers 20 by 0.001, the other run prefers 21 by 0.0005 -> a float16 tie;
    # step 2 then continues from different tokens and is not compared (its tokens differ wildly here)
    other = result([REF["prompts"][0]["steps"][0], step(21, {20: -3.0005, 21: -3.000}), step(99, {99: -0.1, 30: -5.0})])
    ok, summary = driver.compare(REF, other, 0.01)
    assert ok, summary
    assert "identical up to ties" in summary and "prompt 0 step 1: 20 vs 21 tied within 0.0010" in summary


@pytest.mark.parametrize("other_top, why", [
    ({20: -3.5, 21: -3.0}, "the other run prefers its pick by 0.5: not a tie"),
    ({21: -3.0, 22: -3.2}, "the other run does not list the reference's pick"),
])
def test_a_later_flip_that_is_not_a_tie_fails(other_top, why):
    other = result([REF["prompts"][0]["steps"][0], step(21, other_top), REF["prompts"][0]["steps"][2]])
    ok, summary = driver.compare(REF, other, 0.01)
    assert not ok, why
    assert "tokens differ at step 1" in summary


def test_a_first_step_flip_is_never_a_tie():
    other = result([step(11, {10: -1.5, 11: -1.499}), *REF["prompts"][0]["steps"][1:]])
    ok, summary = driver.compare(REF, other, 0.01)
    assert not ok and "tokens differ at step 0" in summary


def test_missing_steps_fail():
    other = result(REF["prompts"][0]["steps"][:2])
    ok, summary = driver.compare(REF, other, 0.01)
    assert not ok and "3 vs 2 steps" in summary


# --- judge: padded TP n vs unpadded TP 1, allowing the drift vLLM shows on a no-padding control ---------

def shifted(base: dict, first: float, tp: int = 4) -> dict:
    """`base` with every first-step log-prob moved by `first` (later steps unchanged)."""
    steps = [dict(s, top=dict(s["top"])) for s in base["prompts"][0]["steps"]]
    steps[0] = step(steps[0]["token"], {int(t): v + first for t, v in steps[0]["top"].items()})
    return result(steps, tp=tp)


FP64 = shifted(REF, 0.02)  # the engine at TP 1 is 0.02 from the float64 reference
CONTROL_FP64 = FP64       # the controls below at TP 1 are REF, so also 0.02 from theirs


def test_judge_passes_a_padded_run_within_the_tolerance_when_the_control_does_not_drift():
    ok, summary = driver.judge(REF, shifted(REF, 0.005), REF, shifted(REF, 0.0), FP64, CONTROL_FP64, 0.01)
    assert ok, summary
    assert "control drift tp1->tp4 0.0000 -> allowance 0.0100" in summary


def test_judge_allows_as_much_as_the_control_drifts_and_no_more():
    # control at TP 4 shifted by -0.03: 0.03 from its TP 1 run and 0.05 (was 0.02) from its fp64
    padded = shifted(REF, -0.05)
    ok, summary = driver.judge(REF, padded, REF, shifted(REF, -0.03), FP64, CONTROL_FP64, 0.01)
    assert ok, summary  # allow 0.01 + 2 x 0.03; fp64: 0.05 further <= 0.01 + 2 x 0.03
    ok, summary = driver.judge(REF, padded, REF, shifted(REF, -0.01), FP64, CONTROL_FP64, 0.01)
    assert not ok and "first-step log-prob diff 0.0500 > 0.03" in summary


def test_judge_never_excuses_a_different_first_token():
    padded = result([step(11, {10: -1.5, 11: -1.499}), *REF["prompts"][0]["steps"][1:]])
    ok, summary = driver.judge(REF, padded, REF, shifted(REF, 0.2), FP64, CONTROL_FP64, 0.01)
    assert not ok and "tokens differ at step 0" in summary


def test_judge_fails_a_padded_run_that_moves_away_from_fp64_more_than_tp_moves_the_control():
    # the control drifts 0.04 at TP 4 but stays 0.02 from its fp64 reference (it moves across it);
    # the padded run is within the drift allowance of the unpadded run (0.05 <= 0.09) but moves from
    # 0.02 to 0.07 away from fp64: 0.05 > 0.01 + 2 x 0
    ok, summary = driver.judge(REF, shifted(REF, -0.05), REF, shifted(REF, 0.04), FP64, CONTROL_FP64, 0.01)
    assert not ok and "padded is 0.0500 further from fp64, > 0.0100" in summary, summary


@pytest.mark.parametrize("broken", ["ref", "padded", "control_tp1", "control", "fp64", "control_fp64"])
def test_judge_fails_when_one_result_has_nothing_to_compare(broken):
    docs = {"ref": REF, "padded": REF, "control_tp1": REF, "control": REF, "fp64": FP64, "control_fp64": FP64}
    docs[broken] = dict(docs[broken], prompts=[])
    ok, summary = driver.judge(**docs, tol=0.01)
    assert not ok and "nothing to compare" in summary
