"""A seeded mutator over a real checkpoint's safetensors headers, index and config.json.

Each case changes one thing (a type swap, a huge or negative number, deep nesting, a truncation, a lying
length, an odd name) and runs `inspect` (and for some cases `pad`) in-process through the CLI entry
point. Every outcome must be a documented exit code with one line on stderr: never exit 70, never a
traceback, never success on a shard the safetensors library itself rejects, and never a changed SRC.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from awqpad.example import make_example
from test_security import INDEX, SHARD1, cli

SEED = 20261203
CASES = {"header": 160, "bytes": 40, "index": 60, "config": 60}
PAD_EVERY = 6  # also run `pad` on every 6th case that inspect accepted
ODD_NAMES = ["", "../x", "/abs", "a" * 5000, "é\u202e", "__metadata__", "x\x00y", ".", "a/../../b", "\\\\srv"]
U64 = (1 << 64) - 1


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header_json: bytes, data: bytes, length: int | None = None) -> bytes:
    header_json += b" " * (-len(header_json) % 8)
    return struct.pack("<Q", len(header_json) if length is None else length) + header_json + data


def _odd_value(rng: random.Random, like=None):
    choices = [True, False, None, -1, -(1 << 63), 0, 1 << 63, U64, U64 + 1, 10**30, 1.5, 1e308, "12", "", [], {},
               [1, 2], {"a": 1}, "x" * 300]
    if isinstance(like, int) and not isinstance(like, bool):
        choices += [like + 1, like - 1, like * 2, -like, like * 1024]
    return rng.choice(choices)


def _nest(rng: random.Random, value, depth: int | None = None):
    for _ in range(depth or rng.choice([2, 20, 70, 300])):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def mutate_header(rng: random.Random, header: dict) -> dict:
    h = copy.deepcopy(header)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    entry = h[name]
    op = rng.randrange(14)
    if op == 0:
        entry["dtype"] = rng.choice(["F16", "BF16", "I32", "U8", "F64", "F4", "F8_E4M3", "Q4", "", 5, None, "f16"])
    elif op == 1:
        if entry["shape"]:
            entry["shape"][rng.randrange(len(entry["shape"]))] = _odd_value(rng, entry["shape"][0])
    elif op == 2:
        entry["shape"] = rng.choice([[], [0], entry["shape"] + [1], entry["shape"][:-1], [U64, 0], [0, U64 + 1],
                                     [1 << 32, 1 << 32, 0], entry["shape"][::-1]])
    elif op == 3:
        entry["data_offsets"][rng.randrange(2)] = _odd_value(rng, entry["data_offsets"][1])
    elif op == 4:
        entry["data_offsets"] = rng.choice([[0], [0, 1, 2], [], "0,1", entry["data_offsets"][::-1], None])
    elif op == 5:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 6:
        h[name] = _odd_value(rng)
    elif op == 7:
        h[rng.choice(ODD_NAMES)] = h.pop(name)
    elif op == 8:
        h["__metadata__"] = rng.choice([5, [], {"a": 1}, {"a": None}, {"a": "b" * 1000}, "x", None, {"format": "pt"}])
    elif op == 9:
        entry[rng.choice(["shape", "dtype", "data_offsets", "extra"])] = _nest(rng, 1)
    elif op == 10:
        del h[name]
    elif op == 11:  # overlap / gap: move one tensor's span
        shift = rng.choice([-8, -1, 1, 8, 4096])
        entry["data_offsets"] = [max(0, o + shift) for o in entry["data_offsets"]]
    elif op == 12:  # two tensors claim the same bytes
        other = h[rng.choice(names)]
        if isinstance(other, dict):
            h[name + ".copy"] = copy.deepcopy(other)
    else:
        entry["shape"] = [True] + entry["shape"][1:] if entry["shape"] else [True]
    return h


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    header, data = _split(raw)
    body = json.dumps(header).encode()
    op = rng.randrange(8)
    if op == 0:
        return raw[: rng.randrange(0, 8 + len(body))]  # truncated inside the length or the header
    if op == 1:
        return _pack(body, data, rng.choice([len(body) + 8 + len(data) + 1, 0, 7, 1 << 63, 100_000_001, U64]))
    if op == 2:
        return _pack(body, data[: rng.randrange(len(data))])  # truncated tensor data
    if op == 3:
        return _pack(body, data + b"\0" * rng.choice([1, 8, 4096]))  # trailing bytes
    if op == 4:
        i = rng.randrange(len(body))
        return _pack(body[:i] + b"\xff\xfe" + body[i:], data)  # invalid UTF-8
    if op == 5:
        i = rng.randrange(len(body))
        return _pack(body[:i] + body[i + 1 :], data)  # broken JSON
    if op == 6:
        return _pack(b"[" * 5000 + b"]" * 5000, data)
    return _pack(body.replace(b'"shape":', b'"shape": ' + b"9" * 5000 + b', "s":', 1), data)


def mutate_index(rng: random.Random, index: dict) -> dict:
    ix = copy.deepcopy(index)
    wm = ix["weight_map"]
    name = rng.choice(sorted(wm))
    op = rng.randrange(8)
    if op == 0:
        wm[name] = _odd_value(rng)
    elif op == 1:
        wm[name] = rng.choice(ODD_NAMES + ["/etc/passwd", "../" + SHARD1, "sub/" + SHARD1, "config.json"])
    elif op == 2:
        del wm[name]
    elif op == 3:
        wm["not.a.tensor"] = SHARD1
    elif op == 4:
        ix["weight_map"] = rng.choice([[], "x", None, 5, _nest(rng, {})])
    elif op == 5:
        ix["metadata"] = rng.choice([None, 5, [], {"total_size": 10**50}, {"total_size": "big"}])
    elif op == 6:
        ix["extra"] = _nest(rng, 0)
    else:
        wm[name] = "model-00002-of-00002.safetensors" if wm[name] == SHARD1 else SHARD1
    return ix


def mutate_config(rng: random.Random, config: dict) -> dict:
    c = copy.deepcopy(config)
    q = c.get("quantization_config", {})
    op = rng.randrange(6)
    if op in (0, 1):
        key = rng.choice(sorted(k for k in c if k != "quantization_config"))
        c[key] = _odd_value(rng, c[key])
    elif op == 2:
        key = rng.choice(sorted(q) + ["modules_to_not_convert", "dynamic", "config_groups"])
        q[key] = _odd_value(rng, q.get(key))
    elif op == 3:
        q["quant_method"] = rng.choice(["gptq", "compressed-tensors", "fp8", "", 5, None, "AWQ", "bitsandbytes"])
    elif op == 4:
        c[rng.choice(["text_config", "architectures", "hidden_size", "rope_scaling"])] = _nest(rng, {"hidden_size": 1})
    else:
        c.pop(rng.choice(sorted(c)))
    return c


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def safetensors_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
        return True
    except Exception:
        return False


def _write_case(base: Path, case: Path, target: str, content: bytes) -> None:
    case.mkdir()
    for f in base.iterdir():
        if f.name == target:
            (case / f.name).write_bytes(content)
        else:
            os.link(f, case / f.name)  # awqpad never writes SRC; the final hash of base checks it


def _cases(base: Path):
    rng = random.Random(SEED)
    shard_raw = (base / SHARD1).read_bytes()
    header, data = _split(shard_raw)
    index = json.loads((base / INDEX).read_text())
    config = json.loads((base / "config.json").read_text())
    for kind, count in CASES.items():
        for i in range(count):
            if kind == "header":
                yield kind, i, SHARD1, _pack(json.dumps(mutate_header(rng, header)).encode(), data)
            elif kind == "bytes":
                yield kind, i, SHARD1, mutate_bytes(rng, shard_raw)
            elif kind == "index":
                yield kind, i, INDEX, json.dumps(mutate_index(rng, index)).encode()
            else:
                yield kind, i, "config.json", json.dumps(mutate_config(rng, config)).encode()


def check_outcome(result, what: str) -> None:
    code, _, err = result
    assert code != 70 and "Traceback" not in err and "internal error" not in err, (what, code, err[-2000:])
    assert code in (0, 1, 2, 3, 4), (what, code, err)
    if code:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith("awqpad: error: "), (what, err)


def test_fuzzed_inputs_fail_cleanly(tmp_path):
    base = make_example(tmp_path / "base")
    before = _tree_hash(base)
    tally = {"cases": 0, "accepted": 0, "padded": 0, "rejected": 0}
    for kind, i, target, content in _cases(base):
        case = tmp_path / f"{kind}-{i}"
        _write_case(base, case, target, content)
        what = f"{kind} case {i}"
        result = cli("inspect", case, "--json")
        check_outcome(result, what)
        tally["cases"] += 1
        if target == SHARD1 and not safetensors_accepts(case / SHARD1):
            assert result[0] != 0, f"{what}: inspect accepted a shard that safetensors rejects"
        if result[0] != 0:
            tally["rejected"] += 1
            continue
        tally["accepted"] += 1
        if tally["accepted"] % PAD_EVERY == 0 or kind == "bytes":
            out = tmp_path / f"out-{kind}-{i}"
            padded = cli("pad", case, out, "--tp", "4", "--quiet")
            check_outcome(padded, what + " (pad)")
            if padded[0] == 0:
                tally["padded"] += 1
                for shard in out.glob("*.safetensors"):
                    assert safetensors_accepts(shard), f"{what}: pad wrote {shard.name}, which safetensors rejects"
                assert all(out in p.resolve().parents for p in out.rglob("*") if p.is_file())
    assert _tree_hash(base) == before, "a fuzz case changed SRC"
    assert tally["cases"] == sum(CASES.values()) and tally["accepted"] and tally["rejected"] > tally["cases"] // 2, tally


def test_a_few_fuzzed_cases_in_a_real_process(tmp_path):
    """The same contract through the console entry point: no traceback on stderr, one error line."""
    base = make_example(tmp_path / "base")
    picked = [c for c in _cases(base) if c[1] % 50 == 7][:4]
    for kind, i, target, content in picked:
        case = tmp_path / f"{kind}-{i}"
        _write_case(base, case, target, content)
        proc = subprocess.run([sys.executable, "-m", "awqpad", "inspect", str(case)], capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "AWQPAD_DEBUG"},
                              cwd=Path(__file__).resolve().parents[1])
        check_outcome((proc.returncode, proc.stdout, proc.stderr), f"{kind} case {i}")
        if proc.returncode:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("seed", range(3))
def test_mutator_is_deterministic(tmp_path, seed):
    header = {"t": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}
    a = mutate_header(random.Random(seed), header)
    b = mutate_header(random.Random(seed), header)
    assert a == b and header == {"t": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}
