"""Config + safetensors headers -> a typed description of the model's linears and MLP widths.

Reads no tensor data. Real dimensions come from tensor shapes (unpacking each format's packing);
config.json values are compared against them and disagreements become findings.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from awqpad.checkpoint import formats
from awqpad.checkpoint.architecture import ROLES, VISION_PREFIXES, Family, compile_patterns, find_family
from awqpad.checkpoint.config import ModelConfig, QuantConfig, module_quant, read_model_config, read_quant_config
from awqpad.checkpoint.foreign import Foreign, recognise
from awqpad.errors import AwqpadError, InputError
from awqpad.checkpoint.header import ShardHeader, TensorInfo
from awqpad.checkpoint.shards import PICKLE_SUFFIXES, Finding, read_shards
from awqpad.source import Source
from awqpad.source.paths import source_file

__all__ = ["PICKLE_SUFFIXES", "Checkpoint", "Finding", "Linear", "MLPBlock", "read_checkpoint"]


@dataclass(frozen=True)
class Linear:
    prefix: str
    role: str  # see architecture.ROLES
    block: str  # attn | dense | expert | shared | router
    layer: int | None
    expert: int | None
    format: str  # awq-gemm | gptq | compressed-tensors | dense
    in_features: int
    out_features: int
    parts: dict[str, TensorInfo] = field(repr=False, compare=False, hash=False)
    bits: int | None = None
    group_size: int | None = None  # -1 per-channel, None unquantized
    groups: int | None = None
    sym: bool = True
    desc_act: bool = False
    gptq_v2: bool = False
    block_n: int | None = None  # FP8 block scales: outputs per scale row (group_size is the block along K)

    @property
    def quantized(self) -> bool:
        return self.format != "dense"

    @property
    def parallel(self) -> str:
        return ROLES[self.role]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())


@dataclass(frozen=True)
class MLPBlock:
    """One gated MLP: a dense layer MLP, one routed expert, or a shared expert."""

    kind: str  # dense | expert | shared
    layer: int
    expert: int | None
    width: int
    linears: tuple[Linear, ...]  # gate+up+down, or gate_up+down
    act_scales: TensorInfo | None = None  # AWQ ScaledActivation of GELU models: pad with 1.0

    @property
    def label(self) -> str:
        tail = {"dense": "mlp", "shared": "shared expert"}.get(self.kind, f"expert {self.expert}")
        return f"layer {self.layer} {tail}"


@dataclass(frozen=True)
class Dims:
    hidden: int | None
    layers: int
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    widths: dict[str, tuple[int, ...]]  # mlp kind -> distinct widths found in tensors
    num_experts: int


@dataclass(frozen=True)
class Checkpoint:
    source: Source
    config: ModelConfig
    quant: QuantConfig
    family: Family
    family_known: bool
    shards: tuple[ShardHeader, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)
    linears: tuple[Linear, ...] = field(repr=False)
    mlps: tuple[MLPBlock, ...] = field(repr=False)
    dims: Dims
    findings: tuple[Finding, ...]
    format: str  # dominant format of the decoder linears
    vision_tensors: int
    index_file: str | None
    other_files: tuple[str, ...]
    foreign: Foreign | None = None  # a quantization awqpad recognises but does not pad (checkpoint/foreign.py)

    @property
    def total_bytes(self) -> int:
        return sum(s.file_size for s in self.shards)

    @property
    def group_size(self) -> int | None:
        sizes = {lin.group_size for lin in self.linears if lin.quantized}
        return sizes.pop() if len(sizes) == 1 else (self.quant.group_size if sizes else None)

    @property
    def bits(self) -> int | None:
        bits = {lin.bits for lin in self.linears if lin.quantized}
        return bits.pop() if len(bits) == 1 else (self.quant.bits if bits else None)

    def config_key(self, kind: str) -> str | None:
        return self.family.keys.get(kind)


# --- modules -------------------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    prefix, _, part = name.rpartition(".")
    return prefix, part


# Ranks (and for CT weight_shape the exact dtype and shape) of each format's tensors, checked before any
# format code indexes a shape: a header may say anything, and pad and verify must refuse the same things.
PART_RANKS = {
    "awq-gemm": {"qweight": 2, "qzeros": 2, "scales": 2, "bias": 1},
    "gptq": {"qweight": 2, "qzeros": 2, "scales": 2, "g_idx": 1, "bias": 1},
    "compressed-tensors": {"weight_packed": 2, "weight_scale": 2, "weight_zero_point": 2, "weight_g_idx": 1,
                           "weight_shape": 1, "bias": 1},
    "dense": {"weight": 2, "bias": 1},
}


def _check_parts(prefix: str, fmt, parts: dict[str, TensorInfo]) -> None:
    for part, rank in PART_RANKS.get(fmt.NAME, {}).items():
        info = parts.get(part)
        if info is not None and len(info.shape) != rank:
            raise InputError(f"{info.shard}: {info.name} has shape {list(info.shape)}; {fmt.NAME} needs {rank} dimension(s)")
    shape = parts.get("weight_shape") if fmt.NAME == "compressed-tensors" else None
    if shape is not None and (shape.dtype != "I64" or shape.shape != (2,)):
        raise InputError(f"{shape.shard}: {shape.name} is {shape.dtype}{list(shape.shape)}; compressed-tensors needs I64[2]")


def _describe_linear(prefix, pattern, match, parts, quant: QuantConfig) -> Linear:
    shard = next(iter(parts.values())).shard
    try:
        fmt = formats.detect(parts, quant.method)
    except (IndexError, KeyError, TypeError, ValueError):  # a format's `claims` met a shape it did not foresee
        fmt = None
    if fmt is None:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(parts.items()))
        raise InputError(f"{shard}: {prefix}: tensors ({shapes}) match no known format "
                         "(AWQ-GEMM, GPTQ, compressed-tensors, dense)")
    if fmt is not formats.dense and not quant.is_quantized:
        if "weight" in parts and parts["weight"].dtype == "F8_E5M2":  # no format pads E5M2: say that, not "no config"
            raise formats.dense.unknown_layout(prefix, parts)
        raise InputError(f"{shard}: {prefix} holds {fmt.NAME} quantized tensors but config.json has no quantization_config "
                         "(nor quantize_config.json), so bits and group size are unknown")
    _check_parts(prefix, fmt, parts)
    mq = module_quant(quant, prefix) if fmt is not formats.dense else None
    try:
        geo = fmt.geometry(prefix, parts, mq, quant)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a lying header the format did not foresee
        raise InputError(f"{shard}: {prefix}: tensor shapes do not fit the {fmt.NAME} layout ({exc.__class__.__name__}: {exc})") from None
    layer = int(match.group("layer")) if "layer" in match.groupdict() else None
    expert = int(match.group("expert")) if match.groupdict().get("expert") is not None else None
    return Linear(
        prefix=prefix,
        role=pattern.role,
        block=pattern.block,
        layer=layer,
        expert=expert,
        format=fmt.NAME,
        in_features=geo.in_features,
        out_features=geo.out_features,
        parts=parts,
        bits=geo.bits,
        group_size=geo.group_size,
        groups=geo.groups,
        sym=mq.sym if mq is not None else True,
        desc_act=("g_idx" in parts or "weight_g_idx" in parts) and bool(mq and mq.desc_act),
        gptq_v2=fmt is formats.gptq and quant.checkpoint_format == "gptq_v2",
        block_n=geo.block_n,
    )


def _group_mlps(linears: list[Linear], act_scales: dict[str, TensorInfo]) -> list[MLPBlock]:
    groups: dict[tuple, list[Linear]] = defaultdict(list)
    for lin in linears:
        if lin.block in ("dense", "expert", "shared") and lin.role in ("gate", "up", "gate_up", "down"):
            groups[(lin.block, lin.layer, lin.expert)].append(lin)
    blocks = []
    for (kind, layer, expert), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2] or -1)):
        roles = {lin.role: lin for lin in members}
        down = roles.get("down")
        if down is None or not ({"gate", "up"} <= roles.keys() or "gate_up" in roles):
            raise InputError(f"{members[0].prefix}: incomplete MLP (found {sorted(roles)}; need gate+up+down or gate_up+down)")
        widths = {down.in_features}
        if "gate_up" in roles:
            if roles["gate_up"].out_features % 2:
                raise InputError(f"{roles['gate_up'].prefix}: fused gate_up has an odd output size {roles['gate_up'].out_features}")
            widths.add(roles["gate_up"].out_features // 2)
        else:
            widths |= {roles["gate"].out_features, roles["up"].out_features}
        if len(widths) != 1:
            raise InputError(f"{down.prefix}: MLP widths disagree between its projections: {sorted(widths)}")
        order = [roles[r] for r in ("gate", "up", "gate_up", "down") if r in roles]
        mlp_prefix = down.prefix.rpartition(".")[0]
        blocks.append(MLPBlock(kind, layer, expert, widths.pop(), tuple(order), act_scales.get(mlp_prefix)))
    return blocks


def read_checkpoint(source: Source) -> Checkpoint:
    root = source.root
    try:
        if not root.is_dir():
            raise InputError(f"{root}: not a directory")
        os.listdir(root)
    except OSError as exc:
        raise InputError(f"{root}: cannot read the checkpoint directory ({exc.strerror or exc})") from None
    if source_file(root, "config.json", f"{root}:", missing_ok=True) is None:
        raise InputError(f"{root}: no config.json")
    config = read_model_config(root)
    quant = read_quant_config(root, config)
    family, known = find_family(config.architecture, config.model_type, config.wrapper_architecture)
    _check_config_sizes(config, family, root)
    headers, tensors, index_name, findings = read_shards(root)
    if not known:
        findings.append(
            Finding("warning", f"unknown architecture {config.architecture or config.model_type!r}: using generic name patterns")
        )

    modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    for name, info in tensors.items():
        prefix, part = _split(name)
        modules[prefix][part] = info

    foreign = recognise(quant, tensors)
    if foreign is not None:
        findings.append(Finding("warning", foreign.summary))
    compiled = compile_patterns(family)
    linears: list[Linear] = []
    act_scales: dict[str, TensorInfo] = {}
    vision = 0
    for prefix, parts in modules.items():
        if VISION_PREFIXES.search(prefix + "."):
            vision += len(parts)
            continue
        if prefix.endswith(".act") and set(parts) == {"scales"}:
            act_scales[prefix[: -len(".act")]] = parts["scales"]
            continue
        for regex, pattern in compiled:
            match = regex.search(prefix)
            if match:
                try:
                    linears.append(_describe_linear(prefix, pattern, match, parts, quant))
                except AwqpadError:
                    if foreign is None:
                        raise
                    # a foreign-quantized linear: reported once through `foreign`, not described
                break

    mlps = _group_mlps(linears, act_scales)
    dims = _dims(config, family, linears, mlps)
    findings += _config_findings(config, family, dims, mlps)
    decoder_formats = [lin.format for lin in linears if lin.block != "router"]
    fmt = max(set(decoder_formats), key=decoder_formats.count) if decoder_formats else "none"
    if quant.method == "awq":
        fmt = "awq-gemm" if quant.version == "gemm" else f"awq-{quant.version}"
    elif foreign is not None:
        fmt = foreign.method
    elif quant.is_quantized and quant.method not in ("gptq", "compressed-tensors", "modelopt"):
        fmt = quant.method
    if not linears:
        findings.append(Finding("warning", "no decoder linear layers recognised from tensor names"))
    other = tuple(
        sorted(
            p.name
            for p in root.iterdir()
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != index_name
        )
    )
    return Checkpoint(
        source, config, quant, family, known, headers, tensors, tuple(linears), tuple(mlps), dims,
        tuple(findings), fmt, vision, index_name, other, foreign,
    )


def _check_config_sizes(config: ModelConfig, family: Family, root: Path) -> None:
    """Every size config.json gives the model (heads, widths, layers, ...) is a positive integer, if present."""
    for kind, key in family.keys.items():
        if not key or key not in config.text:
            continue
        value = config.get(key)
        if value is None:
            continue
        smallest = 0 if kind in ("expert", "shared") else 1  # 0: the model has no such MLP
        if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
            raise InputError(f"{root / 'config.json'}: {key} = {str(value)[:40]} is not a {'non-negative' if smallest == 0 else 'positive'} integer")


def _dims(config: ModelConfig, family: Family, linears: list[Linear], mlps: list[MLPBlock]) -> Dims:
    keys = family.keys

    def cfg(kind):
        key = keys.get(kind)
        value = config.get(key) if key else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    heads = cfg("heads")
    kv = cfg("kv_heads")
    if family.name == "chatglm" and not config.get("multi_query_attention", False):
        kv = heads
    if kv is None and not family.mla:
        kv = heads
    head_dim = cfg("head_dim")
    hidden = cfg("hidden")
    if head_dim is None and heads:
        q = next((lin for lin in linears if lin.role == "q"), None)
        head_dim = q.out_features // heads if q is not None and not family.mla else (hidden // heads if hidden else None)
    widths: dict[str, set[int]] = defaultdict(set)
    for block in mlps:
        widths[block.kind].add(block.width)
    experts = {(b.layer, b.expert) for b in mlps if b.kind == "expert"}
    per_layer = defaultdict(int)
    for layer, _ in experts:
        per_layer[layer] += 1
    layers = cfg("layers") or (max((lin.layer for lin in linears if lin.layer is not None), default=-1) + 1)
    return Dims(
        hidden, layers, heads, kv, head_dim,
        {k: tuple(sorted(v)) for k, v in widths.items()},
        max(per_layer.values(), default=0),
    )


def _config_findings(config: ModelConfig, family: Family, dims: Dims, mlps: list[MLPBlock]) -> list[Finding]:
    out = []
    for kind, widths in dims.widths.items():
        if len(widths) > 1:
            out.append(Finding("warning", f"{kind} MLP widths differ between layers: {list(widths)}"))
        key = family.keys.get(kind)
        if key is None:
            continue
        value = config.get(key)
        if not isinstance(value, int):
            continue
        factor = family.dense_key_factor if kind == "dense" else 1
        tensor_width = max(widths)
        if value == tensor_width * factor:
            if factor != 1:
                out.append(Finding("info", f"{key} {value} is {factor} x the projection width {tensor_width} ({family.name} convention)"))
            continue
        if value < tensor_width * factor:
            out.append(
                Finding(
                    "error",
                    f"config {key} = {value} is SMALLER than the tensors ({tensor_width * factor}): engines would "
                    f"drop {tensor_width * factor - value} channels per MLP (was config.json hand-edited?)",
                )
            )
        elif value == 2 * tensor_width:
            out.append(Finding("warning", f"config {key} = {value} is twice the tensor width {tensor_width} (Qwen v1 style?)"))
        else:
            out.append(Finding("error", f"config {key} = {value} disagrees with the tensors ({tensor_width})"))
    return out
