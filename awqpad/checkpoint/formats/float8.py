"""Float8 byte tables (numpy, no torch): decode e4m3fn / e4m3fnuz, encode exact values.

e4m3fn (OCP, torch.float8_e4m3fn, safetensors F8_E4M3): bias 7, no infinities, S.1111.111 is NaN,
0x80 is -0.0. e4m3fnuz (AMD, torch.float8_e4m3fnuz): bias 8, 0x80 is the only NaN, no -0.0. ROCm
engines load e4m3fn checkpoints by reinterpreting the bits as fnuz, rewriting 0x80 to 0 and doubling
the scales (vLLM quantization/utils/w8a8_utils.py and SGLang fp8_utils.py
`normalize_e4m3fn_to_e4m3fnuz`: "The bits pattern 10000000(-128) represents zero in e4m3fn but NaN in
e4m3fnuz. So here we set it to 0.").
"""

from __future__ import annotations

import numpy as np

from awqpad.errors import UnsupportedError


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


E4M3FN = np.array([_e4m3(c, 7, False) for c in range(256)], dtype=np.float64)
E4M3FNUZ = np.array([_e4m3(c, 8, True) for c in range(256)], dtype=np.float64)
TABLES = {"F8_E4M3": E4M3FN}


def decode_e4m3fnuz_raw(codes: np.ndarray) -> np.ndarray:
    """The bytes read as e4m3fnuz with no rewriting (0x80 -> NaN): what a path that skips the
    normalization sees."""
    return E4M3FNUZ[np.asarray(codes, dtype=np.uint8)]


def decode_e4m3fnuz_normalized(codes: np.ndarray) -> np.ndarray:
    """The bytes as a ROCm engine reads them after normalize_e4m3fn_to_e4m3fnuz (scale doubled by the caller)."""
    c = np.asarray(codes, dtype=np.uint8)
    return E4M3FNUZ[np.where(c == 0x80, 0, c)]


def encode(dtype: str, value: float) -> bytes:
    """One byte of `dtype` that holds `value` exactly; +0.0 is 0x00, never 0x80."""
    table = TABLES.get(dtype)
    if table is None:
        raise UnsupportedError(f"cannot pad a tensor of dtype {dtype}")
    hits = [c for c in range(256) if table[c] == value and not (value == 0 and c & 0x80)]
    if not hits:
        raise UnsupportedError(f"{value!r} is not exactly representable in {dtype}")
    return bytes([hits[0]])
