"""Format registry: an explicit tuple; which one owns a module is decided by quant_method first."""

from awqpad.checkpoint.formats import awq_gemm, compressed_tensors, dense, fp8, gptq, nvfp4

FORMATS = (awq_gemm, gptq, compressed_tensors, nvfp4, fp8, dense)
BY_NAME = {fmt.NAME: fmt for fmt in FORMATS}
BY_METHOD = {"awq": awq_gemm, "gptq": gptq, "compressed-tensors": compressed_tensors, "modelopt": nvfp4}


def detect(parts: dict, method: str):
    """The format module that owns a module's tensors, or None.

    Packed tensors are read as the config's quant_method says (AWQ and GPTQ both call their tensors
    `qweight`); plain float `.weight` modules are dense whatever the method. NVFP4 is told apart by its
    tensors (a float8 block scale next to a uint8 weight), whichever config names it; FP8 `weight`
    tensors (F8_* dtype) are fp8 whichever config names them (block-FP8 or compressed-tensors).
    """
    if nvfp4.claims(parts):
        return nvfp4
    if fp8.claims(parts):
        return fp8
    if dense.claims(parts) and not any(k in parts for k in ("qweight", "weight_packed")):
        return dense
    fmt = BY_METHOD.get(method)
    if fmt is not None and fmt.claims(parts):
        return fmt
    for candidate in (compressed_tensors, awq_gemm, gptq):
        if candidate.claims(parts):
            return candidate
    return None


def readers_of(linears) -> tuple[str, ...]:
    """Every reader variant that decodes any of `linears`, in first-seen order (for running a block under each)."""
    names: list[str] = []
    for lin in linears:
        for reader in BY_NAME[lin.format].readers(lin):
            if reader not in names:
                names.append(reader)
    return tuple(names)
