"""A check that compared nothing must not pass: verify on a SRC whose values are all NaN/inf, and on outputs
tampered so that a check finds nothing to compare (it fails, saying why); outputs that legitimately hold none of
what a check compares (nothing padded, only regrouped) pass, that check saying it does not apply."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.factory import Model, Quant, build_checkpoint, load_tensors, shard_files, write_safetensors
from tests.factory import _header  # the stored dtype of each tensor
from tests.test_verify import SMALL, TP, awqpad, checks, failed, pad, set_json, verify_json


def _poison_scales(src, value: float, every: bool) -> None:
    """Set the fp16 scales of every MLP module (all modules if `every`) to `value`, in place."""
    for f in shard_files(src):
        header, _ = _header(f)
        tensors = load_tensors(f)
        for name, a in tensors.items():
            if name.endswith(".scales") and (every or ".mlp." in name):
                tensors[name] = np.full_like(a, value)
        write_safetensors(f, [(n, header[n]["dtype"], a) for n, a in tensors.items()], {"format": "pt"})


def test_all_nan_src_fails_the_function_check_and_says_why(tmp_path):
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    _poison_scales(src, np.nan, every=True)
    out = pad(src, tmp_path / "out")
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1, report
    why = failed(report)[f"function TP={TP}"]
    assert why.startswith("not compared: all ") and "NaN/inf in SRC itself" in why, why
    assert checks(report)[f"function TP={TP}"]["figures"]["nonfinite_outputs"] > 0


def test_some_finite_outputs_still_compare(tmp_path):
    """inf in one layer's MLP only: the finite blocks are compared, so the check can pass."""
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    for f in shard_files(src):
        header, _ = _header(f)
        tensors = load_tensors(f)
        for name in tensors:
            if name.startswith("model.layers.0.mlp.") and name.endswith(".scales"):
                tensors[name] = np.full_like(tensors[name], np.inf)
        write_safetensors(f, [(n, header[n]["dtype"], a) for n, a in tensors.items()], {"format": "pt"})
    out = pad(src, tmp_path / "out")
    code, report, _ = verify_json(src, out, "--tp", TP)
    function = checks(report)[f"function TP={TP}"]
    assert function["ok"], function
    assert code == 0, failed(report)


# --- every check that can compare nothing: tampered outputs that leave it nothing must fail, saying why -----------


def _padded(tmp_path, quant=Quant("awq"), model=None, strategy="pad"):
    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, model or Model(**SMALL), quant, shards=2)
    code, _, err = awqpad("pad", src, out, "--tp", TP, "--strategy", strategy, "--engine", "vllm-latest", "--quiet")
    assert code == 0, err
    return src, out


def _not_applicable(check: dict) -> bool:
    return check["ok"] and check["detail"].startswith("does not apply: ") and check["figures"]["informational"]


def test_ops_that_record_no_inserts_leave_pad_fill_and_zeros_nothing_and_fail(tmp_path):
    """awqpad.json still records the padded shapes but no insert: the grown region is nobody's to check.
    (OUT alone: nothing else contradicts the record.)"""
    _, out = _padded(tmp_path)
    set_json(out / "awqpad.json", lambda d: [op.update(inserts=[]) for op in d["ops"]])
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1, report
    bad = failed(report)
    assert bad["pad-fill"].startswith("not compared: awqpad.json records 18 padded tensors but no inserted element "
                                      "was read: 18 of them grew but record no insert"), bad["pad-fill"]
    assert bad["zeros"].startswith("not compared: awqpad.json records 18 padded tensors but no padded row or column "
                                   "of a linear was dequantized: 6 padded linears record no inserted rows / columns "
                                   "in their qweight"), bad["zeros"]
    assert checks(report)["zeros"]["figures"]["weights"] == 0


def test_output_given_as_its_own_source_compares_no_original_region(tmp_path):
    """`verify OUT OUT`: SRC's tensors already have the padded shapes, so no original region can be read."""
    _, out = _padded(tmp_path)
    code, report, _ = verify_json(out, out, "--tp", TP)
    assert code == 1, report
    why = failed(report)["bytes-original"]
    assert why.startswith("not compared: none of the 18 padded tensors is in SRC with the dtype and shape awqpad.json "
                          "records as its original"), why
    assert checks(report)["bytes-original"]["figures"]["compared"] == 0


def test_source_of_another_dtype_compares_no_byte(tmp_path):
    """SRC rebuilt as bf16 for an fp16 OUT: no tensor matches by dtype, so neither byte check read anything."""
    model = Model(**{**SMALL, "intermediate": 641})
    _, out = _padded(tmp_path, Quant("fp16"), model)
    other = tmp_path / "bf16"
    build_checkpoint(other, model, Quant("bf16"), shards=2)
    code, report, _ = verify_json(other, out, "--tp", TP)
    assert code == 1, report
    bad = failed(report)
    assert bad["bytes-unchanged"].startswith("not compared: none of the ") and "no byte was compared" in bad["bytes-unchanged"]
    assert bad["bytes-original"].startswith("not compared: none of the "), bad["bytes-original"]


# Qwen2.5-7B's head layout (28 query / 4 KV heads), narrow: TP 8 needs 32 heads (tests/test_heads_cli.py).
HEADS = dict(hidden=448, intermediate=1024, heads=28, kv_heads=4, head_dim=16, layers=2)


def _heads_padded(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, Model("qwen2", **HEADS), Quant("fp16"), shards=2)
    code, _, err = awqpad("pad", src, out, "--tp", 8, "--engine", "sglang", "--pad-heads", "--quiet")
    assert code == 0, err
    return src, out


def test_attention_with_no_layer_to_simulate_fails_and_layers_none_says_it_does_not_apply(tmp_path):
    src, out = _heads_padded(tmp_path)
    code, report, _ = verify_json(src, out, "--layers", "none")
    assert code == 0, failed(report)
    assert _not_applicable(checks(report)["attention"]), checks(report)["attention"]
    assert _not_applicable(checks(report)["function TP=8"])
    # SRC whose attention awqpad does not recognize (renamed): heads were padded, yet no layer can be simulated
    for f in shard_files(src):
        header, _ = _header(f)
        tensors = load_tensors(f)
        write_safetensors(f, [(n.replace(".self_attn.", ".attn_renamed."), header[n]["dtype"], a)
                              for n, a in tensors.items()], {"format": "pt"})
    set_json(src / "model.safetensors.index.json", lambda d: d.update(weight_map={
        n.replace(".self_attn.", ".attn_renamed."): f for n, f in d["weight_map"].items()}))
    code, report, _ = verify_json(src, out)
    assert code == 1
    why = failed(report)["attention"]
    assert why == ("not compared: SRC has no attention linears that awqpad recognizes, so the padded heads were not "
                   "simulated"), why


# --- outputs that legitimately have nothing of some kind still pass, saying what does not apply ------------------


def test_padded_output_compares_everything(tmp_path):
    src, out = _padded(tmp_path)
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 0, failed(report)
    by = checks(report)
    assert by["pad-fill"]["figures"]["compared"] == 18 and by["bytes-original"]["figures"]["compared"] == 18
    assert by["zeros"]["figures"]["weights"] > 0 and by["bytes-unchanged"]["figures"]["tensors"] > 0
    assert not any(c["detail"].startswith(("does not apply", "not compared")) for c in report["checks"])


@pytest.mark.parametrize("quant", [Quant("awq"), Quant("gptq")], ids=["awq", "gptq"])
def test_regrouped_output_passes_with_the_padding_checks_not_applying(tmp_path, quant):
    src, out = _padded(tmp_path, quant, strategy="regroup")
    code, report, _ = verify_json(src, out, "--tp", TP, "--engine", "vllm-latest")
    assert code == 0, failed(report)
    by = checks(report)
    for name in ("pad-fill", "bytes-original", "zeros"):
        assert _not_applicable(by[name]) and "regroup" in by[name]["detail"], by[name]
    assert by["regroup"]["ok"] and by["regroup"]["figures"]["linears_compared"] > 0
    assert by["bytes-unchanged"]["ok"] and by["bytes-unchanged"]["figures"]["tensors"] > 0


def test_regroup_check_without_src_does_not_apply_and_with_nothing_comparable_fails(tmp_path):
    src, out = _padded(tmp_path, strategy="regroup")
    code, report, _ = verify_json(out, "--tp", TP, "--engine", "vllm-latest")
    assert code == 0, failed(report)
    assert _not_applicable(checks(report)["regroup"]) and "no SRC" in checks(report)["regroup"]["detail"]
    # the record's regrouped shapes no longer match OUT: nothing the check could compare
    set_json(out / "awqpad.json", lambda d: [op.update(new_shape=[s + 1 for s in op["new_shape"]])
                                             for op in d["ops"] if op.get("regroup", 1) > 1])
    code, report, _ = verify_json(src, out, "--tp", TP, "--engine", "vllm-latest")
    assert code == 1
    why = failed(report)["regroup"]
    assert why.startswith("not compared: none of the ") and "regrouped tensors" in why, why


def test_unchanged_copy_says_the_padding_checks_do_not_apply(tmp_path):
    """SRC already loads at TP 2, so `pad` writes nothing; a plain copy verified against SRC compares every byte
    and fails only for the missing awqpad.json."""
    src = tmp_path / "src"
    build_checkpoint(src, Model(**{**SMALL, "intermediate": 512}), Quant("awq"), shards=2)
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert set(failed(report)) == {"provenance"}, failed(report)
    by = checks(report)
    for name in ("pad-fill", "bytes-original", "zeros"):
        assert _not_applicable(by[name]) and "nothing was padded" in by[name]["detail"], by[name]
    assert by["bytes-unchanged"]["ok"] and by["bytes-unchanged"]["figures"]["tensors"] == 55  # every tensor
