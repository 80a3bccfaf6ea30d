"""verify's `checksums`: the sha256 `pad` records while writing each file catch any later change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.factory import Model, Quant, build_checkpoint
from tests.test_verify import SMALL, awqpad, checks, edit, failed, pad, set_json, verify_json


def _padded(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    return src, pad(src, tmp_path / "out")


def test_record_holds_the_sha256_of_every_written_file(tmp_path):
    _, out = _padded(tmp_path)
    files = json.loads((out / "awqpad.json").read_text())["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "awqpad.json")
    assert sorted(files) == on_disk  # shards, index, config, README, tokenizer_config: all of them
    for name, entry in files.items():  # judged by hashlib over the files as they are now
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    code, report, _ = verify_json(out)
    assert code == 0, failed(report)
    assert checks(report)["checksums"]["figures"]["files"] == len(on_disk)


def test_a_flipped_bit_in_an_untouched_tensor_fails_without_src(tmp_path):
    """No SRC, so no byte compare: only the recorded hash can see a change to an unpadded tensor."""
    _, out = _padded(tmp_path)
    edit(out, "model.layers.0.self_attn.q_proj.scales", lambda a: a.view("u2").__setitem__((0, 0), a.view("u2")[0, 0] ^ 1))
    code, report, _ = verify_json(out)
    assert code == 1
    assert set(failed(report)) == {"checksums"}, failed(report)
    assert "changed after padding" in failed(report)["checksums"]


def test_an_edited_side_file_fails(tmp_path):
    _, out = _padded(tmp_path)
    (out / "tokenizer_config.json").write_text('{"model_max_length": 8192}\n')
    code, report, _ = verify_json(out)
    assert code == 1 and failed(report)["checksums"].startswith("tokenizer_config.json: sha256")


def test_a_listed_file_that_is_gone_or_outside_out_fails(tmp_path):
    _, out = _padded(tmp_path)
    (out / "tokenizer_config.json").unlink()
    set_json(out / "awqpad.json", lambda d: d["files"].__setitem__("../elsewhere.json", {"size": 1, "sha256": "0" * 64}))
    code, report, _ = verify_json(out)
    assert code == 1
    problems = checks(report)["checksums"]["figures"]["problems"]
    assert any("tokenizer_config.json: recorded in awqpad.json but missing" in p for p in problems), problems
    assert any("../elsewhere.json" in p for p in problems), problems


def test_no_recorded_hashes_means_does_not_apply_not_a_pass(tmp_path):
    """An awqpad.json without sha256 (an older awqpad) gives nothing to compare: the check says so."""
    _, out = _padded(tmp_path)
    set_json(out / "awqpad.json", lambda d: [e.pop("sha256", None) for e in d["files"].values()])
    code, report, _ = verify_json(out)
    check = checks(report)["checksums"]
    assert check["detail"].startswith("does not apply: awqpad.json records no sha256"), check
    assert check["figures"]["applies"] is False and check["figures"]["files"] == 0
    assert code == 0, failed(report)


def test_hard_linked_out_hashes_only_what_it_copied(tmp_path):
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    code, _, err = awqpad("pad", src, tmp_path / "tp1", "--tp", 1, "--quiet")
    assert code == 0, err
    record = json.loads((tmp_path / "tp1" / "awqpad.json").read_text())
    assert record["padding_needed"] is False
    hashed = [n for n, e in (record.get("files") or {}).items() if isinstance(e, dict) and "sha256" in e]
    assert hashed == []  # same filesystem: everything was a hard link, nothing was written, nothing hashed
    code, report, _ = verify_json(tmp_path / "tp1", "--tp", 1)
    assert code == 0, failed(report)


def test_hash_trails_the_writer_through_both_copy_paths(tmp_path, monkeypatch):
    """The sha256 is read back from the file by a thread just behind the writer. With tiny chunks and lag
    bound (so the writer really waits on the hasher), through copy_file_range and through the buffered
    fallback a file system without it takes, every recorded hash is hashlib's over the file."""
    import os

    from awqpad.execute import shard_writer, trailing_hash

    monkeypatch.setattr(trailing_hash, "HASH_CHUNK", 4096)
    monkeypatch.setattr(trailing_hash, "HASH_LAG", 8192)
    monkeypatch.setattr(shard_writer, "COPY_CHUNK", 3000)  # not a multiple of the hash chunk
    src = tmp_path / "src"
    build_checkpoint(src, Model(**SMALL), Quant("awq"), shards=2)
    from awqpad.api import pad as api_pad

    for name in ("kernel", "buffered"):
        if name == "buffered":
            monkeypatch.delattr(os, "copy_file_range")
        out = tmp_path / name
        api_pad(str(src), out, tp=2)
        files = json.loads((out / "awqpad.json").read_text())["files"]
        shards = [n for n in files if n.endswith(".safetensors")]
        assert len(shards) == 2
        for shard in shards:
            assert files[shard]["sha256"] == hashlib.sha256((out / shard).read_bytes()).hexdigest(), (name, shard)
    assert (tmp_path / "kernel" / shards[0]).read_bytes() == (tmp_path / "buffered" / shards[0]).read_bytes()
