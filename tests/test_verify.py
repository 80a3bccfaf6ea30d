"""`awqpad verify`: passes on every padded fixture, and fails with the right message on broken outputs.

Checkpoints come from tests/factory.py and are padded by the real `awqpad pad` command; broken outputs
are copies of a padded OUT damaged with plain file writes. Commands run in-process through the CLI
entry point (`awqpad.cli.main`), so exit codes are exactly what a shell sees.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from awqpad.cli import main
from tests.factory import W8, Model, Quant, build_checkpoint

SMALL = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=640)  # 640 = 5 groups: 2.5 per rank at TP 2
TP = 2
CASES = {
    "awq": (Model(**SMALL), Quant("awq")),
    "gptq-v1-sym": (Model(**SMALL), Quant("gptq")),
    "gptq-v2-asym": (Model(**SMALL), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
    "gptq-act-order": (Model(**SMALL), Quant("gptq", desc_act=True)),
    "gptq-8bit": (Model(**SMALL), Quant("gptq", bits=8)),
    "ct-sym": (Model(**SMALL), Quant("ct")),
    "ct-asym-act-order": (Model(**SMALL), Quant("ct", sym=False, desc_act=True)),
    "fp16": (Model(**{**SMALL, "intermediate": 641}), Quant("fp16")),  # 641 % 2: the split itself fails
    "bf16": (Model(**{**SMALL, "intermediate": 641}), Quant("bf16")),
    "moe-qwen2": (Model(arch="qwen2_moe", **SMALL), Quant("awq")),
    "moe-deepseek-v2": (Model(arch="deepseek_v2", **{**SMALL, "kv_heads": 4}), Quant("gptq")),  # tied shared experts
    "phi3-fused-gate-up": (Model(arch="phi3", **SMALL), Quant("gptq", sym=False, checkpoint_format="gptq_v2")),
}


def awqpad(*args) -> tuple[int, str, str]:
    """Run the `awqpad` CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), mock.patch.object(sys, "argv", ["awqpad", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def verify_json(*args) -> tuple[int, dict, str]:
    code, out, err = awqpad("verify", *args, "--json")
    return code, (json.loads(out) if out.strip() else {}), err


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def tampered(report: dict, file_changed: bool = True) -> dict[str, str]:
    """The failures of the check families a tampering test is about. Any change to a file pad wrote also
    fails `checksums` (tests/test_checksums.py), so that one is asserted here and left out of the result."""
    failures = failed(report)
    if file_changed:
        assert "checksums" in failures, failures
    return {name: detail for name, detail in failures.items() if name != "checksums"}


def pad(src: Path, out: Path, tp: int = TP) -> Path:
    # these fixtures are about padding; regrouped outputs are verified in test_regroup.py
    code, _, err = awqpad("pad", src, out, "--tp", tp, "--strategy", "pad", "--quiet")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """name -> (SRC, OUT) padded for TP 2, built once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            model, quant = CASES[name]
            build_checkpoint(root / "src", model, quant, shards=3)
            made[name] = (root / "src", pad(root / "src", root / "out"))
        return made[name]

    return get


@pytest.fixture
def broken(padded, tmp_path):
    """A writable copy of a padded OUT: broken("awq") -> (SRC, OUT copy)."""

    def get(name: str = "awq") -> tuple[Path, Path]:
        src, out = padded(name)
        copy = tmp_path / f"{name}-out"
        shutil.copytree(out, copy)
        return src, copy

    return get


# --- raw file surgery (independent of awqpad's readers) --------------------------------------------------

NP = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "BF16": np.uint16}


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]


def locate(root: Path, name: str) -> tuple[Path, int, str, list[int]]:
    shard = root / weight_map(root)[name]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + n])[name]
    return shard, 8 + n + entry["data_offsets"][0], entry["dtype"], entry["shape"]


def edit(root: Path, name: str, change) -> None:
    """Read tensor `name` as numpy, let `change` modify it in place, write it back (same size)."""
    shard, begin, dtype, shape = locate(root, name)
    count = int(np.prod(shape))
    with open(shard, "r+b") as fh:
        fh.seek(begin)
        arr = np.frombuffer(fh.read(count * np.dtype(NP[dtype]).itemsize), NP[dtype]).reshape(shape).copy()
        change(arr)
        fh.seek(begin)
        fh.write(arr.tobytes())


def set_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# --- passing fixtures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_verify_passes_on_padded_output(padded, name):
    src, out = padded(name)
    code, report, err = verify_json(src, out, "--tp", TP)
    assert code == 0, (failed(report), err)
    assert report["passed"] is True
    by_name = checks(report)
    assert set(by_name) == {"structure", "provenance", "config", "index", "tensors", f"rules vllm TP={TP}",
                            f"shards TP={TP}", "pad-fill", "bytes-original", "bytes-unchanged", "zeros",
                            f"function TP={TP}", f"before TP={TP}", "checksums"}
    function = by_name[f"function TP={TP}"]["figures"]
    assert function["blocks"] >= 2 and function["max_rel_error"] < 1e-12
    assert by_name["zeros"]["figures"]["weights"] > 0
    before = by_name[f"before TP={TP}"]
    quantized = CASES[name][1].method in ("awq", "gptq", "ct")
    if quantized and CASES[name][1].desc_act:  # scales replicated: the shard exists, the engine still refuses
        assert "every rank's shard can be formed (act-order: every rank holds all scale rows)" in before["detail"]
        assert "down_proj input per rank 320 is not a multiple of 128" in before["detail"]
    elif quantized:  # the story: the unpadded source gives some rank a partial group, and the engine refuses
        assert "groups of 128" in before["detail"] and "rows would be shared" in before["detail"], before
        assert before["figures"]["first_rank"] == 0
        # each format quotes the text vLLM prints for it (issue 15: CT used to quote AWQ's)
        awq_text = "This can be caused by too large tensor parallel size."
        if CASES[name][1].method == "awq":
            assert awq_text in before["detail"]
        else:
            assert awq_text not in before["detail"] and "Consider reducing tensor_parallel_size" in before["detail"]
    else:
        assert "641 does not split over 2 ranks" in before["detail"]
        assert "641 is not divisible by 2" in before["detail"]
    # Standalone (no SRC) passes too.
    code, report, err = verify_json(out, "--tp", TP)
    assert code == 0, (failed(report), err)
    assert "bytes-unchanged" not in checks(report) and f"function TP={TP}" not in checks(report)


def test_readers_cover_every_gptq_variant(padded):
    _, out = padded("gptq-v1-sym")
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 0
    assert checks(report)["zeros"]["figures"]["readers"] == ["marlin-sym", "v1-masked", "v1-unmasked"]
    _, out = padded("gptq-v2-asym")
    assert checks(verify_json(out, "--tp", TP)[1])["zeros"]["figures"]["readers"] == ["v2"]


def test_tp4_fixture_and_before_story(tmp_path):
    """hidden 512 / 8 heads so that attention itself splits at TP 4; 2432 = 19 groups -> 4.75 per rank."""
    src = tmp_path / "src"
    build_checkpoint(src, Model(hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=2432, layers=3),
                     Quant("awq"), shards=2)
    out = pad(src, tmp_path / "out", 4)
    code, report, err = verify_json(src, out, "--tp", 4, "--layers", "all")
    assert code == 0, (failed(report), err)
    by_name = checks(report)
    assert by_name["function TP=4"]["figures"]["blocks"] == 3
    before = by_name["before TP=4"]["detail"]
    assert "rank 0: model.layers.0.mlp.down_proj inputs [0, 608) = 4.75 groups of 128" in before
    assert "The input size is not aligned with the quantized weight shape" in before
    assert by_name["before TP=4"]["figures"]["partial_ranks"] == [0, 1, 2, 3]


def test_human_report(padded):
    src, out = padded("awq")
    code, text, _ = awqpad("verify", src, out, "--tp", TP)
    assert code == 0
    assert "✓" in text and "bytes-unchanged" in text and "PASSED" in text
    assert "max relative error" in text


def test_tp_and_engine_default_to_awqpad_json(padded):
    src, out = padded("awq")
    code, report, _ = verify_json(src, out)
    assert code == 0 and report["tp"] == [TP] and report["engine"] == "vllm"


def test_layers_none_runs_static_checks_only(padded):
    src, out = padded("awq")
    code, report, _ = verify_json(src, out, "--tp", TP, "--layers", "none")
    assert code == 0
    assert checks(report)[f"function TP={TP}"]["figures"]["blocks"] == 0
    # The before story comes from shapes, so it is still told.
    assert "inputs [0, 320) = 2.5 groups of 128" in checks(report)[f"before TP={TP}"]["detail"]


# --- broken outputs: each must fail, with the message that names the problem ------------------------------


def test_nonzero_scale_in_padded_region(broken):
    _, out = broken("awq")
    edit(out, "model.layers.0.mlp.gate_proj.scales", lambda a: a.__setitem__((0, 640), np.float16(1.0)))
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    # q = z = 8 still dequantizes to 0, so only the fill check can see it: that is why it exists.
    assert set(tampered(report)) == {"pad-fill"}
    assert ("model.layers.0.mlp.gate_proj.scales[0, 640] = 1.0 in the padded region, expected 0.0"
            in failed(report)["pad-fill"])


def test_gptq_pad_with_zero_words_and_nonzero_scale(broken):
    src, out = broken("gptq-v1-sym")
    prefix = "model.layers.1.mlp.up_proj"

    def zero_words(a):
        a[:, 640:] = 0

    edit(out, f"{prefix}.qweight", zero_words)  # [K/8, N]: padded outputs are columns 640..767
    edit(out, f"{prefix}.qzeros", lambda a: a.__setitem__((slice(None), slice(80, None)), 0))
    edit(out, f"{prefix}.scales", lambda a: a.__setitem__((slice(None), slice(640, None)), np.float16(0.25)))
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    bad = failed(report)
    assert {"zeros", "pad-fill"} <= set(bad)
    # v1 reads stored zero 0 as z = 1 and Marlin-sym as z = 8: (0 - z) * 0.25 != 0.
    assert (f"{prefix}: padded outputs [640, 768) dequantize to non-zero under reader v1-masked "
            "(32768 weights, max |w| = 0.25)") in bad["zeros"]
    problems = " ".join(checks(report)["zeros"]["figures"]["problems"])
    assert "reader v1-unmasked" in problems and "reader marlin-sym (32768 weights, max |w| = 2)" in problems
    assert f"{prefix}.qweight[0, 640] = 0 in the padded region, expected -2004318072 (word 0x88888888)" in bad["pad-fill"]


def test_qweight_column_shifted_by_one_word(broken):
    src, out = broken("awq")

    def shift(a):  # [K, N/8]: 80 original words then 16 pad words; the last original word moves into the pad
        a[:, 80] = a[:, 79]
        a[:, 79] = W8

    edit(out, "model.layers.0.mlp.gate_proj.qweight", shift)
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    bad = failed(report)
    assert {"pad-fill", "bytes-original", f"function TP={TP}"} <= set(bad)
    assert "model.layers.0.mlp.gate_proj.qweight[0, 80] = " in bad["pad-fill"]
    assert "model.layers.0.mlp.gate_proj.qweight[0, 79] = -2004318072 in OUT but" in bad["bytes-original"]
    assert "layer 0 mlp: sharded OUT differs from SRC by" in bad[f"function TP={TP}"]
    # Standalone, the fill check alone still catches it.
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1 and "pad-fill" in failed(report)


def test_config_intermediate_size_disagrees_with_tensors(broken):
    src, out = broken("awq")
    set_json(out / "config.json", lambda c: c.__setitem__("intermediate_size", 640))
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    bad = failed(report)["config"]
    assert "config intermediate_size = 640 is SMALLER than the tensors (768)" in bad
    problems = checks(report)["config"]["figures"]["problems"]
    assert "config.json intermediate_size = 640 but awqpad.json says pad set it to 768" in problems
    set_json(out / "config.json", lambda c: c.__setitem__("intermediate_size", 1000))
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert "config intermediate_size = 1000 disagrees with the tensors (768)" in failed(report)["config"]


def test_index_points_at_the_wrong_shard(broken):
    _, out = broken("awq")
    name = "model.layers.0.mlp.down_proj.scales"
    right = weight_map(out)[name]
    wrong = next(s for s in sorted(set(weight_map(out).values())) if s != right)
    set_json(out / "model.safetensors.index.json", lambda i: i["weight_map"].__setitem__(name, wrong))
    code, report, err = verify_json(out, "--tp", TP)
    assert code == 1, err  # a damaged OUT is a failed verify, not bad input
    assert tampered(report) == {"structure": f"{out.resolve()}/model.safetensors.index.json: names tensor {name!r} in "
                                           f"{wrong} but that shard lacks it (it is in {right})"}


def test_missing_tensor(broken):
    from safetensors.numpy import load_file, save_file

    src, out = broken("awq")
    name = "model.norm.weight"
    shard = out / weight_map(out)[name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    assert f"names tensor {name!r} in {shard.name} but that shard lacks it" in failed(report)["structure"]
    assert f"{shard.name} is " in failed(report)["provenance"]  # awqpad.json's size record disagrees too
    # Gone from the index as well: the reader accepts the repo, the comparison with SRC does not.
    set_json(out / "model.safetensors.index.json", lambda i: i["weight_map"].pop(name))
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert failed(report)["tensors"] == f"1 SRC tensor(s) missing from OUT: {name}"
    assert "index" in failed(report)


def test_truncated_shard(broken):
    _, out = broken("awq")
    shard = sorted(out.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 4)
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    bad = failed(report)
    assert f"{shard.name}: tensor data runs to byte {size} but the file has {size - 4} bytes (truncated?)" in bad["structure"]
    assert f"{shard.name} is {size - 4} bytes but awqpad.json records {size}" in bad["provenance"]


def test_unchanged_tensor_with_one_flipped_byte(broken):
    src, out = broken("awq")
    name = "model.layers.1.input_layernorm.weight"
    shard, begin, _, shape = locate(out, name)
    with open(shard, "r+b") as fh:
        fh.seek(begin + 5)
        byte = fh.read(1)
        fh.seek(begin + 5)
        fh.write(bytes([byte[0] ^ 0x10]))
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert tampered(report) == {"bytes-unchanged": f"{name} differs from SRC at byte 5 of {2 * shape[0]} (1 byte(s) differ); "
                                                 "pad should have copied it unchanged"}
    # Without SRC only the sha256 pad recorded while writing knows what an unpadded tensor held.
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1 and set(failed(report)) == {"checksums"}, failed(report)


def test_tp_the_padding_does_not_satisfy(padded):
    src, out = padded("awq")  # padded for TP 2: 768 = 6 groups, 1.5 per rank at TP 4
    code, report, _ = verify_json(src, out, "--tp", 2, "--tp", 4)
    assert code == 1
    bad = failed(report)
    assert set(bad) == {"rules vllm TP=4", "shards TP=4", "function TP=4"}
    assert bad["rules vllm TP=4"].startswith("MLP down_proj input per rank 192 is not a multiple of 128")
    assert "The input size is not aligned with the quantized weight shape" in bad["rules vllm TP=4"]
    assert "rank 0: model.layers.0.mlp.down_proj inputs [0, 192) = 1.5 groups of 128" in bad["shards TP=4"]
    assert "rank 0: model.layers.0.mlp.down_proj inputs [0, 192) = 1.5 groups of 128" in bad["function TP=4"]


def test_record_that_lies_about_the_fill(broken):
    """awqpad.json edited to match a corrupted scale: standalone it is self-consistent, SRC exposes it."""
    src, out = broken("awq")
    name = "model.layers.0.mlp.up_proj.scales"
    edit(out, name, lambda a: a.__setitem__((slice(None), slice(640, None)), np.float16(1.0)))

    def lie(record):
        for op in record["ops"]:
            if op["tensor"] == name:
                op["inserts"][0]["fill"]["value"] = 1.0

    set_json(out / "awqpad.json", lie)
    # q = z, so even the weights are still exactly zero: standalone, only the recorded sha256 sees the edit
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1 and set(failed(report)) == {"checksums"}, failed(report)
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert f"{name}: awqpad.json records" in failed(report)["provenance"]
    assert '"value": 0.0' in failed(report)["provenance"]


def test_missing_awqpad_json(broken):
    src, out = broken("awq")
    (out / "awqpad.json").unlink()
    code, _, err = awqpad("verify", out, "--tp", TP)
    assert code == 2 and "no awqpad.json" in err
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert set(failed(report)) == {"provenance"}
    assert failed(report)["provenance"].startswith("no awqpad.json in OUT")
    assert checks(report)["zeros"]["ok"] and checks(report)["pad-fill"]["ok"]  # ops derived from SRC instead


def test_wrong_source(padded, tmp_path):
    src, out = padded("awq")
    # Same layout, other weights: awqpad.json's fingerprint covers config + headers only; the bytes differ.
    other = tmp_path / "other"
    build_checkpoint(other, Model(**SMALL), Quant("awq"), shards=3, seed=7)
    code, report, _ = verify_json(other, out, "--tp", TP)
    assert code == 1
    assert {"bytes-unchanged", "bytes-original", f"function TP={TP}"} <= set(failed(report))
    # Same weights, another config.json: the fingerprint says so.
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    set_json(edited / "config.json", lambda c: c.__setitem__("rope_theta", 1.0))
    code, report, _ = verify_json(edited, out, "--tp", TP)
    assert code == 1
    assert "OUT was padded from a different source" in failed(report)["provenance"]


# --- bad input: exit 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (("a", "b", "c", "--tp", "2"), "expected OUT or SRC OUT, got 3 paths"),
    (("{out}", "--tp", "2", "--engine", "nope"), "--engine 'nope' is not one of"),
    (("{out}", "--tp", "2", "--layers", "middle"), "--layers 'middle'"),
    (("{src}", "{out}", "--tp", "2", "--layers", "99"), "layer(s) [99] have no MLP"),
    (("/nonexistent/src", "{out}", "--tp", "2"), "/nonexistent/src: no such directory"),
    (("{empty}", "{out}", "--tp", "2"), "no config.json"),
])
def test_bad_input_exits_2(padded, tmp_path, args, needle):
    src, out = padded("awq")
    (tmp_path / "empty").mkdir()
    args = [a.format(src=src, out=out, empty=tmp_path / "empty") for a in args]
    code, _, err = awqpad("verify", *args)
    assert code == 2, err
    assert needle in err and err.startswith("awqpad: error: ")


def test_sampled_simulation_still_catches_a_shifted_column(broken, monkeypatch):
    """Blocks over SIM_BUDGET weights simulate rank edges and the padded tail only; a damaged last
    original word sits right before the tail and is still caught."""
    import awqpad.verify.function

    monkeypatch.setattr(awqpad.verify.function, "SIM_BUDGET", 1)
    src, out = broken("awq")
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 0
    function = checks(report)[f"function TP={TP}"]
    assert function["figures"]["sampled_blocks"] == 2 and "simulate a sample of whole groups" in function["detail"]

    def shift(a):
        a[:, 80] = a[:, 79]
        a[:, 79] = W8

    edit(out, "model.layers.1.mlp.up_proj.qweight", shift)
    code, report, _ = verify_json(src, out, "--tp", TP)
    assert code == 1
    assert "layer 1 mlp: sharded OUT differs from SRC by" in failed(report)[f"function TP={TP}"]


def test_one_broken_expert_among_identical_ones(broken):
    """Experts share one dequantization when their padding is byte-identical; a damaged one is checked alone."""
    _, out = broken("moe-qwen2")
    prefix = "model.layers.1.mlp.experts.2.up_proj"  # AWQ [K, N/8]: 640 -> 768 outputs = words 80..95
    edit(out, f"{prefix}.qweight", lambda a: a.__setitem__((slice(None), slice(80, None)), 0))
    edit(out, f"{prefix}.scales", lambda a: a.__setitem__((slice(None), slice(640, None)), np.float16(0.5)))
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    bad = tampered(report)
    assert set(bad) == {"pad-fill", "zeros"}
    assert bad["zeros"] == (f"{prefix}: padded outputs [640, 768) dequantize to non-zero under reader awq "
                            "(32768 weights, max |w| = 4)")  # (0 - 8) * 0.5
    zeros = checks(report)["zeros"]["figures"]
    assert zeros["linears"] == 30 and zeros["dequantized"] < 10


def test_act_order_g_idx_fill_pointing_at_a_real_group(broken):
    """Padded inputs mapped to group 0 instead of their fresh groups: q = z = 8 hides it from every
    reader, so the fill check is what must catch it."""
    _, out = broken("gptq-act-order")
    name = "model.layers.0.mlp.down_proj.g_idx"
    edit(out, name, lambda a: a.__setitem__(slice(640, None), 0))
    code, report, _ = verify_json(out, "--tp", TP)
    assert code == 1
    assert set(tampered(report)) == {"pad-fill"}
    assert failed(report)["pad-fill"].startswith(
        f"{name}[640] = 0 in the padded region, expected 5 (group ids 5 + i // 128); 128 padded element(s) differ")
