"""config.json (with nested VL text configs) and quantization_config -> typed configs.

Only reads JSON: no transformers AutoConfig (no network, no remote code).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awqpad.checkpoint.formats import fp8_config
from awqpad.errors import InputError, UnsupportedError
from awqpad.source import bounded_json
from awqpad.source.paths import source_file

# Keys under which VL / wrapper models nest the language model's config
# (Qwen2.5-VL `text_config`, InternVL `llm_config`, DeepSeek-VL / others `language_config`).
NESTED_TEXT_KEYS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class ModelConfig:
    raw: dict[str, Any]  # the whole config.json
    text_path: tuple[str, ...]  # where the language model's keys live: () or ("text_config",) ...
    architecture: str  # first entry of `architectures` of the text model (or the wrapper)
    wrapper_architecture: str | None  # e.g. Qwen2VLForConditionalGeneration, InternVLChatModel
    model_type: str

    @property
    def text(self) -> dict[str, Any]:
        node = self.raw
        for key in self.text_path:
            node = node[key]
        return node

    def get(self, key: str, default: Any = None) -> Any:
        return self.text.get(key, default)


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" | "gptq" | "compressed-tensors" | "none" | other recognised names
    bits: int | None = None
    group_size: int | None = None
    sym: bool = True  # AWQ: not zero_point
    desc_act: bool = False
    version: str | None = None  # AWQ layout: gemm / gemv / gemv_fast / marlin / exllama
    checkpoint_format: str | None = None  # GPTQ: gptq (v1) / gptq_v2 / marlin / ...; CT: pack-quantized ...
    pack_dtype: str = "int32"
    not_converted: tuple[str, ...] = ()  # AWQ modules_to_not_convert / CT ignore
    dynamic: tuple[tuple[str, dict], ...] = ()  # GPTQModel per-module overrides, in order
    ct_groups: tuple[dict, ...] = ()  # compressed-tensors config groups
    raw: dict | None = None

    @property
    def is_quantized(self) -> bool:
        return self.method != "none"


def _read_json(root: Path, name: str, kind: str) -> Any:
    """A JSON file of SRC, confined to SRC and bounded (see source/bounded_json); None if it does not exist."""
    path = source_file(root, name, f"{root}:", missing_ok=True)
    return None if path is None else bounded_json.read(path, kind, str(root / name))


# --- typed access to untrusted JSON: wrong types are one line naming the file and key, never a crash -----

def _int(node: dict, key: str, default, where: str, *, group_size: bool = False):
    """node[key] as an int (bools are not ints); group sizes must be -1 or >= 1, other counts >= 1."""
    value = node.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: {key} must be an integer, got {str(value)[:40]!r}")
    if (value < 1 and not (group_size and value == -1)):
        raise InputError(f"{where}: {key} = {value} is not valid" + (" (use -1 for per-channel)" if group_size else ""))
    return value


def _strings(node: dict, key: str, where: str) -> tuple[str, ...]:
    value = node.get(key) or ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {key} must be a list of strings, got {str(value)[:40]!r}")
    return tuple(value)


def _str(node: dict, key: str, default: str, where: str) -> str:
    value = node.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InputError(f"{where}: {key} must be a string, got {str(value)[:40]!r}")
    return value


def _first_architecture(node: dict, where: str) -> str | None:
    archs = node.get("architectures")
    if archs is None or archs == []:
        return None
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{where}: architectures must be a list of strings, got {str(archs)[:40]!r}")
    return archs[0]


def _compile(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InputError(f"{where}: {pattern[:60]!r} is not a valid regular expression ({exc})") from None


def read_model_config(root: Path) -> ModelConfig:
    raw = _read_json(root, "config.json", "config")
    if raw is None:
        raise InputError(f"{root}: no config.json")
    if not isinstance(raw, dict):
        raise InputError(f"{root / 'config.json'}: config.json is not a JSON object")
    where = str(root / "config.json")
    wrapper_arch = _first_architecture(raw, where)
    model_type = _str(raw, "model_type", "", where)
    for key in NESTED_TEXT_KEYS:
        nested = raw.get(key)
        if isinstance(nested, dict) and ("hidden_size" in nested or "num_hidden_layers" in nested):
            arch = _first_architecture(nested, f"{where}: {key}") or wrapper_arch or ""
            return ModelConfig(raw, (key,), arch, wrapper_arch, _str(nested, "model_type", "", f"{where}: {key}") or model_type)
    return ModelConfig(raw, (), wrapper_arch or "", None, model_type)


def read_quant_config(root: Path, model: ModelConfig) -> QuantConfig:
    q = model.raw.get("quantization_config") or model.text.get("quantization_config")
    if q is None and (root / "hf_quant_config.json").exists():
        # NVIDIA ModelOpt exports keep it here ({"producer": ..., "quantization": {"quant_algo": ...}});
        # vLLM detects ModelOpt checkpoints by this file (docs/features/quantization/modelopt.md).
        q = _read_json(root, "hf_quant_config.json", "side")
        if isinstance(q, dict):
            q = dict(q, quant_method="modelopt")
    if q is None:
        # Older AutoGPTQ / AutoAWQ repos keep it in a side file.
        for side in ("quantize_config.json", "quant_config.json"):
            q = _read_json(root, side, "side")
            if q is not None:
                if not isinstance(q, dict):
                    raise InputError(f"{root / side}: not a JSON object")
                q.setdefault("quant_method", "gptq" if side == "quantize_config.json" else "awq")
                break
    if q is None:
        return QuantConfig("none")
    if not isinstance(q, dict):
        raise InputError(f"{root / 'config.json'}: quantization_config is not an object")
    where = f"{root / 'config.json'}: quantization_config"
    method = q.get("quant_method") or q.get("method") or ""
    if not isinstance(method, str):
        raise InputError(f"{where}: quant_method must be a string, got {str(method)[:40]!r}")
    method = method.lower()
    if method == "awq":
        return QuantConfig(
            "awq",
            bits=_int(q, "bits" if "bits" in q else "w_bit", 4, where),
            group_size=_int(q, "group_size" if "group_size" in q else "q_group_size", 128, where, group_size=True),
            sym=not bool(q.get("zero_point", True)),
            version=_str(q, "version", "gemm", where).lower(),
            not_converted=_strings(q, "modules_to_not_convert", where),
            raw=q,
        )
    if method == "gptq":
        fmt = (_str(q, "checkpoint_format", "", where) or _str(q, "format", "", where) or "gptq").lower()
        dynamic = q.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise InputError(f"{where}: dynamic must be an object")
        for pattern, override in dynamic.items():
            _compile(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, f"{where}: dynamic")
            if not isinstance(override, (dict, type(None))):
                raise InputError(f"{where}: dynamic[{pattern[:40]!r}] must be an object")
            for key in ("bits", "group_size"):
                _int(override or {}, key, None, f"{where}: dynamic[{pattern[:40]!r}]", group_size=key == "group_size")
        return QuantConfig(
            "gptq",
            bits=_int(q, "bits", 4, where),
            group_size=_int(q, "group_size", 128, where, group_size=True),
            sym=bool(q.get("sym", True)),
            desc_act=bool(q.get("desc_act", False)),
            checkpoint_format=fmt,
            pack_dtype=_str(q, "pack_dtype", "int32", where).replace("torch.", ""),
            dynamic=tuple((k, dict(v or {})) for k, v in dynamic.items()),
            raw=q,
        )
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise InputError(f"{where}: config_groups must be an object of named groups, got {type(groups).__name__}")
        for name, group in groups.items():
            gwhere = f"{where}: config_groups[{name[:40]!r}]"
            if not isinstance(group, dict):
                raise InputError(f"{gwhere} must be an object")
            for target in _strings(group, "targets", gwhere):
                if target.startswith("re:"):
                    _compile(target[3:], gwhere)
            weights = group.get("weights") or {}
            if not isinstance(weights, dict):
                raise InputError(f"{gwhere}: weights must be an object")
            _int(weights, "num_bits", 4, f"{gwhere}: weights")
            _int(weights, "group_size", None, f"{gwhere}: weights", group_size=True)
            _str(weights, "strategy", "group", f"{gwhere}: weights")
        ignore = _strings(q, "ignore", where)
        for target in ignore:
            if target.startswith("re:"):
                _compile(target[3:], f"{where}: ignore")
        return QuantConfig(
            "compressed-tensors",
            checkpoint_format=_str(q, "format", "", where),
            not_converted=ignore,
            ct_groups=tuple(dict(g, _name=name) for name, g in groups.items()),
            raw=q,
        )
    if method in ("modelopt", "modelopt_fp4"):
        return modelopt_quant_config(q, root)
    if method:
        return QuantConfig(method, raw=q)
    raise InputError(f"{root / 'config.json'}: quantization_config has no quant_method")


def modelopt_quant_config(q: dict, root: Path) -> QuantConfig:
    """ModelOpt: `quant_algo` / `group_size` / `exclude_modules` at the top (config.json) or under
    `quantization` (hf_quant_config.json), as vLLM's ModelOptNvFp4Config.from_config reads both."""
    body = q.get("quantization") if isinstance(q.get("quantization"), dict) else q
    algo = str(body.get("quant_algo") or "").upper()
    if not algo:
        raise InputError(f"{root}: ModelOpt quantization config has no quant_algo")
    excluded = body.get("exclude_modules") or body.get("ignore") or ()
    if not isinstance(excluded, (list, tuple)) or not all(isinstance(m, str) for m in excluded):
        raise InputError(f"{root}: ModelOpt exclude_modules must be a list of module names")
    return QuantConfig(
        "modelopt",
        bits=4 if algo == "NVFP4" else None,
        group_size=int(body.get("group_size") or 16) if algo == "NVFP4" else None,
        checkpoint_format=algo.lower(),
        not_converted=tuple(excluded),
        raw=q,
    )


# --- per-module resolution -------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleQuant:
    """The quantization parameters config.json gives one linear module."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False


def _ct_target_matches(target: str, name: str) -> bool:
    # compressed-tensors: "re:<regex>" matches the module name; plain strings match the name
    # (or a suffix of it) or the module class, and every module we look at is a Linear.
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear" or name == target or name.endswith("." + target)


def module_quant(q: QuantConfig, module: str) -> ModuleQuant | None:
    """Quantization parameters for `module` according to the config (None = not quantized)."""
    if q.method == "awq":
        if any(skip in module for skip in q.not_converted):
            return None
        return ModuleQuant(q.bits or 4, q.group_size, q.sym)
    if q.method == "gptq":
        bits, group, sym, desc = q.bits or 4, q.group_size, q.sym, q.desc_act
        for pattern, override in q.dynamic:
            # GPTQModel: "-:regex" excludes the module, "+:regex" or bare "regex" overrides it.
            negative = pattern.startswith("-:")
            body = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if re.match(body, module):
                if negative:
                    return None
                bits = int(override.get("bits", bits))
                group = int(override.get("group_size", group))
                sym = bool(override.get("sym", sym))
                desc = bool(override.get("desc_act", desc))
                break
        return ModuleQuant(bits, group, sym, desc)
    if q.method == "modelopt":
        # exclude_modules are fnmatch patterns ("lm_head", "model.layers.*.mlp.gate"), as vLLM's
        # ModelOptQuantConfigBase.is_layer_excluded matches them.
        if any(fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(module, pat + ".*") or module.endswith("." + pat)
               for pat in q.not_converted):
            return None
        return ModuleQuant(q.bits or 4, q.group_size or 16, True)
    if q.method == "compressed-tensors":
        group = ct_group_for(q, module)
        if group is not None:
            w = group.get("weights") or {}
            strategy = w.get("strategy", "group")
            gsize = -1 if strategy in ("channel", "tensor") else int(w.get("group_size") or 128)
            return ModuleQuant(
                int(w.get("num_bits", 4)), gsize, bool(w.get("symmetric", True)), w.get("actorder") == "group"
            )
        return None
    return None


def ct_group_for(q: QuantConfig, module: str) -> dict | None:
    """The compressed-tensors config group whose targets match `module` (None: ignored or unmatched)."""
    if any(_ct_target_matches(t, module) for t in q.not_converted):
        return None
    for group in q.ct_groups:
        if any(_ct_target_matches(t, module) for t in group.get("targets", ())):
            return group
    return None


def check_supported_quant(q: QuantConfig, where: Path) -> None:
    """Refuse quantization schemes whose on-disk layout awqpad cannot pad exactly."""
    if q.method == "awq":
        if q.version != "gemm":
            raise UnsupportedError(
                f"{where}: AWQ version {q.version!r} is not supported; only the GEMM layout "
                "(AutoAWQ version 'gemm', which vLLM/SGLang/LMDeploy load) can be padded",
                hint="re-export the model with AutoAWQ version='gemm' or llm-compressor",
            )
        if q.bits != 4:
            raise UnsupportedError(f"{where}: AWQ with {q.bits} bits is not supported (AWQ-GEMM is 4-bit only)")
    elif q.method == "gptq":
        if q.checkpoint_format not in ("gptq", "gptq_v2"):
            raise UnsupportedError(
                f"{where}: GPTQ checkpoint_format {q.checkpoint_format!r} is not supported; "
                "only 'gptq' (v1) and 'gptq_v2' layouts can be padded (marlin/bitblas/gptq_p are pre-permuted)"
            )
        if q.pack_dtype != "int32":
            raise UnsupportedError(f"{where}: GPTQ pack_dtype {q.pack_dtype!r} is not supported; only int32")
        bits = {q.bits} | {int(o["bits"]) for _, o in q.dynamic if "bits" in o}
        if bits - {4, 8}:
            raise UnsupportedError(
                f"{where}: GPTQ {sorted(bits - {4, 8})}-bit is not supported; only 4- and 8-bit "
                "(2/3-bit words straddle value boundaries and no engine shards them at TP>1)"
            )
    elif q.method == "modelopt":
        if q.checkpoint_format != "nvfp4":
            raise UnsupportedError(
                f"{where}: ModelOpt quant_algo {q.checkpoint_format.upper()!r} is not supported; awqpad pads ModelOpt NVFP4 only"
            )
        if q.group_size != 16:
            raise UnsupportedError(f"{where}: ModelOpt NVFP4 with group_size {q.group_size} is not supported; NVFP4 is group 16")
    elif q.method == "compressed-tensors" and q.checkpoint_format == "nvfp4-pack-quantized":
        check_ct_nvfp4(q, where)
    elif q.method == "compressed-tensors":
        if q.checkpoint_format not in ("pack-quantized", "float-quantized", ""):
            raise UnsupportedError(
                f"{where}: compressed-tensors format {q.checkpoint_format!r} is not supported; only 'pack-quantized' "
                "and 'float-quantized' (FP8)"
            )
        for group in q.ct_groups:
            w = group.get("weights") or {}
            if w.get("type") == "float":
                fp8_config.check_ct_float(group, where)  # FP8 W8A8 too: padding is exact for any activation scheme
                continue
            if w.get("type", "int") != "int" or int(w.get("num_bits", 4)) not in (4, 8):
                raise UnsupportedError(
                    f"{where}: compressed-tensors group {group['_name']!r} ({w.get('type')}, {w.get('num_bits')} bits) "
                    "is not supported; only int4/int8 pack-quantized"
                )
            if group.get("input_activations"):
                raise UnsupportedError(
                    f"{where}: compressed-tensors group {group['_name']!r} quantizes activations; only weight-only "
                    "(W4A16/W8A16) schemes are supported"
                )
    elif q.method == "fp8":
        fp8_config.check_native(q, where)
    elif q.method != "none":
        label = {"fp8": "FP8", "bitsandbytes": "bitsandbytes", "hqq": "HQQ", "exl2": "EXL2"}.get(q.method, q.method)
        raise UnsupportedError(
            f"{where}: quantization method {label!r} is not supported yet; awqpad pads AWQ-GEMM, GPTQ, "
            "compressed-tensors pack-quantized and unquantized checkpoints"
        )


def check_ct_nvfp4(q: QuantConfig, where: Path) -> None:
    """compressed-tensors nvfp4-pack-quantized: every group FP4 (float, 4 bits), group 16, symmetric.

    Activation quantization (NVFP4 W4A4) is fine to pad: padded down_proj inputs are exactly 0, and
    the FP4 activation quantizer gives an all-zero group a zero output scale instead of dividing by
    it (vLLM csrc/quantization/fp4/nvfp4_quant_kernels.cu cvt_warp_fp16_to_fp4:
    `outputScale = SFValue != 0 ? reciprocal(...) : 0.0f`).
    """
    for group in q.ct_groups:
        w = group.get("weights") or {}
        kind, bits, size = w.get("type"), w.get("num_bits"), w.get("group_size")
        if kind != "float" or bits != 4 or size != 16 or not w.get("symmetric", True):
            raise UnsupportedError(
                f"{where}: compressed-tensors group {group['_name']!r} ({kind}, {bits} bits, group {size}) in an "
                "nvfp4-pack-quantized checkpoint is not supported; only symmetric FP4 in groups of 16"
            )
