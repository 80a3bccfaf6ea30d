"""The safetensors header reader agrees with safetensors itself on good files and names the problem on bad ones."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from awqpad.errors import InputError
from awqpad.checkpoint.header import encode_header, read_header


def _raw(path, header: dict, data: bytes, pad_to=None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones((4,), np.int32), "c": np.zeros((0, 5), np.float32)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == {"a": ("F16", (2, 3)), "b": ("I32", (4,)), "c": ("F32", (0, 5))}
    raw = (tmp_path / "m.safetensors").read_bytes()
    a = header.tensors["a"]
    assert np.frombuffer(raw[a.begin : a.end], np.float16).tolist() == tensors["a"].ravel().tolist()


def test_encode_header_round_trips_through_safetensors(tmp_path):
    from safetensors.numpy import load_file

    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    head = encode_header([("x", "I32", (3, 4), arr.nbytes)], {"k": "v"})
    assert (len(head) - 8) % 8 == 0
    (tmp_path / "x.safetensors").write_bytes(head + arr.tobytes())
    assert (load_file(tmp_path / "x.safetensors")["x"] == arr).all()


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"t": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0", "unknown dtype 'Q9'"),
        ({"t": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4, "byte span 4 does not match F16 x [3] = 6 bytes"),
        ({"t": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "u": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, b"\0" * 6, "overlaps"),
        ({"t": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}}, b"\0" * 8, "gap of 4 bytes"),
        ({"t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 6, "2 unexpected trailing bytes"),
        ({"t": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 4, "end before they begin"),
        ({"t": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape must be a list of non-negative"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings to strings"),
    ],
)
def test_bad_headers_are_named(tmp_path, header, data, message):
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match="bad.safetensors") as err:
        read_header(path)
    assert message in err.value.message


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(InputError, match="header length 10000 is larger than the file"):
        read_header(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "nj.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_header(path)


def test_file_too_short(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(InputError, match="too short"):
        read_header(path)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InputError, match="exceeds"):
        read_header(path)
