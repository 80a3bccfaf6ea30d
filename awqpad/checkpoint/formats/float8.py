"""Float8 byte tables (numpy, no torch): decode e4m3fn / e4m3fnuz, encode exact values.

e4m3fn (OCP, torch.float8_e4m3fn, safetensors F8_E4M3): bias 7, no infinities, S.1111.111 is NaN,
0x80 is -0.0. e4m3fnuz (AMD, torch.float8_e4m3fnuz): bias 8, 0x80 is the only NaN, no -0.0. ROCm
engines load e4m3fn checkpoints by reinterpreting the bits as fnuz, rewriting 0x80 to 0 and doubling
the scales (vLLM quantization/utils/w8a8_utils.py and SGLang fp8_utils.py
`normalize_e4m3fn_to_e4m3fnuz`: "The bits pattern 10000000(-128) represents zero in e4m3fn but NaN in
e4m3fnuz. So here we set it to 0.").
"""

from __future__ import annotations

from functools import lru_cache

from awqpad.errors import UnsupportedError
from awqpad.lazy import numpy as np

DTYPES = ("F8_E4M3",)  # safetensors dtypes with a byte table here


def _e4m3(code: int, bias: int, fnuz: bool) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 7
    if fnuz and code == 0x80:
        return float("nan")
    if not fnuz and exp == 15 and man == 7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0 ** (1 - bias)
    return sign * (1 + man / 8) * 2.0 ** (exp - bias)


@lru_cache(maxsize=None)
def _table(bias: int, fnuz: bool):
    # built on first use: importing the formats stays numpy-free, which keeps `awqpad inspect` fast
    table = np.array([_e4m3(c, bias, fnuz) for c in range(256)], dtype=np.float64)
    table.flags.writeable = False
    return table


def e4m3fn():
    """byte -> float64 value under e4m3fn."""
    return _table(7, False)


def e4m3fnuz():
    """byte -> float64 value under e4m3fnuz."""
    return _table(8, True)


def table(dtype: str):
    """byte -> float64 value for a safetensors dtype in DTYPES."""
    if dtype == "F8_E4M3":
        return e4m3fn()
    raise UnsupportedError(f"no float8 table for dtype {dtype}")


def decode_e4m3fnuz_raw(codes: np.ndarray) -> np.ndarray:
    """The bytes read as e4m3fnuz with no rewriting (0x80 -> NaN): what a path that skips the
    normalization sees."""
    return e4m3fnuz()[np.asarray(codes, dtype=np.uint8)]


def decode_e4m3fnuz_normalized(codes: np.ndarray) -> np.ndarray:
    """The bytes as a ROCm engine reads them after normalize_e4m3fn_to_e4m3fnuz (scale doubled by the caller)."""
    c = np.asarray(codes, dtype=np.uint8)
    return e4m3fnuz()[np.where(c == 0x80, 0, c)]


def encode(dtype: str, value: float) -> bytes:
    """One byte of `dtype` that holds `value` exactly; +0.0 is 0x00, never 0x80."""
    if dtype not in DTYPES:
        raise UnsupportedError(f"cannot pad a tensor of dtype {dtype}")
    values = table(dtype)
    hits = [c for c in range(256) if values[c] == value and not (value == 0 and c & 0x80)]
    if not hits:
        raise UnsupportedError(f"{value!r} is not exactly representable in {dtype}")
    return bytes([hits[0]])
