"""Attention-head padding: zero query heads (and, where needed, zero KV groups) so heads split over TP.

A query head whose q_proj rows (and q bias) are 0 scores 0 against every key, so it attends uniformly
and its context is the running mean of V: NOT zero. What makes the padding exact is that the o_proj
input columns of that head are 0 too. Under grouped-query attention (GQA) query head i reads KV head
i // (heads / kv_heads) (HF `repeat_kv`, vLLM's per-rank layout), so the zero heads must keep every
real head in its group:

* insert-in-groups: (r' - r) zero query heads at the END OF EACH KV GROUP (r = heads / kv_heads);
  kv_heads and the KV cache are unchanged. Appending them after the last group would shift every
  later head into another group: wrong (attention_sim demonstrates it).
* new-kv-groups: whole zero KV groups appended (zero k/v heads + r' zero query heads each). Needed when
  the KV head count itself is the blocker (e.g. TGI without KV replication, or 10 KV heads at TP 16).
  It grows the KV cache by (kv' - kv) / kv.
* append: MHA (every head its own group: zero q/k/v heads appended) and MQA (one group: zero query
  heads appended to it).

Layouts (architecture.py): separate q/k/v/o; fused [q; k; v] (Phi-3 qkv_proj, ChatGLM
query_key_value, Baichuan W_pack); InternLM2 wqkv grouped per KV head [(q_1..q_r, k, v) per group].
q/k/v biases pad 0; Qwen3 q_norm / k_norm are per head_dim and stay. o_proj inputs are inserted at
head boundaries, so a quantized o_proj needs head_dim % group_size == 0 (whole groups per head).

config.json gets the new num_attention_heads (and KV head count), plus an explicit head_dim: after
padding, hidden_size / num_attention_heads no longer gives it. Not every engine reads head_dim for
every architecture: HEAD_DIM_SUPPORT records, per architecture and engine, the first release read
that does (each entry names the file it was read in).

Refused (UnsupportedError): ALiBi (slopes depend on the head count), MLA, unknown architectures,
attention parameters with a head axis awqpad does not know (e.g. gpt-oss sinks), q/k norms over the
whole projection, quantized o_proj whose groups straddle heads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from awqpad.checkpoint import formats
from awqpad.checkpoint.model import Checkpoint, Linear
from awqpad.engines.profiles import ENGINES
from awqpad.errors import UnsupportedError
from awqpad.checkpoint.formats.base import LogicalInsert, TensorOp
from awqpad.checkpoint.header import tensor_nbytes
from awqpad.engines.evaluate import Violation, applies, attn_subject, evaluate, multiple_of

HEAD_QUANTITIES = ("heads", "kv_heads", "attn.K_r", "attn.N_r")
HEAD_RULES = ("heads", "kv_heads", "attn-o-groups", "attn-qkv-marlin-n")
MAX_GROWTH = 4  # never propose more than MAX_GROWTH x the query heads
GROUPED_QKV = ("internlm2",)  # [(q_1..q_r, k, v) per KV group]
NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadDimSupport:
    """Whether an engine sizes attention from config.json `head_dim` for one architecture."""

    engine: str  # vllm | sglang | tgi | lmdeploy | trtllm | transformers
    status: str  # "yes" (since `since`) | "never" (in every release read) | "unverified"
    since: str | None  # first release read that honours head_dim
    checked: str  # releases read
    source: str  # file / function read

    @property
    def text(self) -> str:
        name = ENGINE_LABEL.get(self.engine, self.engine)
        if self.status == "yes":
            return f"{name} >= {self.since} ({self.source}; read {self.checked})"
        if self.status == "never":
            return f"{name}: ignores head_dim in every release read ({self.source}; read {self.checked})"
        return f"{name}: unverified" + (f" ({self.source})" if self.source else "")


@dataclass(frozen=True)
class HeadBlocker:
    """Head padding cannot make the requested TP work (same fields as plan.Blocker)."""

    engine: str
    tp: int
    rule: str
    message: str
    explanation: str
    nearest_tp: tuple[int, ...] = ()


@dataclass(frozen=True)
class HeadPlan:
    family: str
    architecture: str
    strategy: str  # none | insert-in-groups | new-kv-groups | insert-in-groups+new-kv-groups | append
    heads: int
    new_heads: int
    kv_heads: int
    new_kv_heads: int
    head_dim: int
    layers: int  # attention layers padded
    reasons: tuple[str, ...]  # rule ids that forced it
    config_updates: dict[str, int]  # dotted config path -> new value
    ops: tuple[TensorOp, ...] = field(repr=False)
    added_bytes: int = 0
    attention_bytes: int = 0  # bytes of the attention linears before padding
    proj_flops_increase: float = 0.0  # q/k/v/o projection FLOPs, fraction
    core_flops_increase: float = 0.0  # QK^T and PV FLOPs (scale with query heads), fraction
    kv_cache_increase: float = 0.0  # fraction
    engine_support: tuple[HeadDimSupport, ...] = ()  # every runtime read (HEAD_DIM_SUPPORT row)
    unsupported_engines: tuple[str, ...] = ()  # selected engines that ignore head_dim for this architecture
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.new_heads, self.new_kv_heads) != (self.heads, self.kv_heads)

    @property
    def head_map(self) -> tuple[int, ...]:
        """New index of every original query head."""
        return head_map(self.heads, self.kv_heads, self.new_heads, self.new_kv_heads)

    @property
    def zero_heads(self) -> tuple[int, ...]:
        kept = set(self.head_map)
        return tuple(i for i in range(self.new_heads) if i not in kept)

    @property
    def caveats(self) -> tuple[str, ...]:
        """Minimum engine versions that read config head_dim for this architecture (one line each)."""
        return tuple(s.text for s in self.engine_support)

    @property
    def summary(self) -> str:
        if not self.changed:
            return f"attention heads {self.heads} (KV {self.kv_heads}) need no padding"
        r, r2 = self.heads // self.kv_heads, self.new_heads // self.new_kv_heads
        how = {
            "insert-in-groups": f"{r2 - r} zero query head(s) at the end of each of the {self.kv_heads} KV groups",
            "new-kv-groups": f"{self.new_kv_heads - self.kv_heads} zero KV group(s) of {r2} query heads appended",
            "insert-in-groups+new-kv-groups": f"{r2 - r} zero query head(s) at the end of each KV group and "
                                              f"{self.new_kv_heads - self.kv_heads} zero KV group(s) appended",
            "append": f"{self.new_heads - self.heads} zero head(s) appended"
                      + (" (with zero K/V heads: MHA)" if self.kv_heads == self.heads and self.heads > 1 else ""),
        }[self.strategy]
        kv = (f"KV heads {self.kv_heads} -> {self.new_kv_heads}, KV cache +{100 * self.kv_cache_increase:.1f} %"
              if self.new_kv_heads != self.kv_heads else "KV cache unchanged")
        return (f"attention heads {self.heads} -> {self.new_heads} ({how}); +{100 * self.proj_flops_increase:.1f} % "
                f"attention projection FLOPs, +{100 * self.core_flops_increase:.1f} % attention score/context FLOPs; {kv}")


# --- engine knowledge: who reads config.head_dim --------------------------------------------------

ENGINE_LABEL = {"vllm": "vLLM", "vllm-latest": "vLLM", "sglang": "SGLang", "tgi": "TGI", "lmdeploy": "LMDeploy",
                "trtllm": "TensorRT-LLM", "transformers": "transformers"}
# Engine profile (engines.ENGINES key) -> the runtime whose code decides.
ENGINE_RUNTIME = {"vllm": "vllm", "vllm-latest": "vllm", "sglang": "sglang", "tgi": "tgi", "lmdeploy": "lmdeploy",
                  "trtllm": "trtllm"}

# Releases read (wheels from PyPI, TGI from its git history; see the report of issue #8):
#   vLLM 0.4.3, 0.5.0-0.5.3, 0.5.5, 0.6.0, 0.6.3, 0.6.6, 0.7.0, 0.7.3, 0.8.0, 0.8.5, 0.9.0, 0.9.2, 0.10.0, 0.10.2,
#        0.11.0, 0.12.0, 0.14.0, 0.18.0, 0.25.0, 0.33.0 (model files + ModelConfig.get_head_size, which reads
#        head_dim in all of them)
#   SGLang 0.3.0, 0.3.6, 0.4.0, 0.4.3, 0.4.6-0.4.10, 0.5.1, 0.5.4, 0.5.8, 0.5.10.post1 (newer wheels not installable
#        here); TGI git history to v3.3.7 / db931fcf (maintenance mode); LMDeploy TurboMind 0.4.0, 0.5.0, 0.6.0, 0.6.5,
#        0.7.0-0.10.0, 0.12.0, 0.15.0, 0.18.0; transformers 4.40, 4.42-4.53 (not all), 4.57.1, 5.0.0, 5.23.0.
#   TensorRT-LLM was not read.
_V = "vLLM 0.4.3-0.33.0"
_S = "SGLang 0.3.0-0.5.10.post1"
_T = "TGI to v3.3.7"
_L = "LMDeploy 0.4.0-0.18.0"
_HF = "transformers 4.40-5.23.0"
_VM = "vllm/model_executor/models/"
_SM = "sglang/srt/models/"
_TM = "server/text_generation_server/models/custom_modeling/"
_TF = "transformers/models/"


def _yes(engine, since, checked, source):
    return HeadDimSupport(engine, "yes", since, checked, source)


def _never(engine, checked, source):
    return HeadDimSupport(engine, "never", None, checked, source)


def _unverified(engine, source=""):
    return HeadDimSupport(engine, "unverified", None, "", source)


_TRT = _unverified("trtllm", "not read: the repository is too large for this study")
_LM_LLAMA = _yes("lmdeploy", "0.6.5", _L, "TurboMind source_model/llama.py model_info, 0.18 turbomind/models/utils.py "
                                          "(0.6.0 derives hidden/heads)")
# Keys: architecture-level where engines differ within an awqpad family.
HEAD_DIM_SUPPORT: dict[str, tuple[HeadDimSupport, ...]] = {
    "llama": (
        _yes("vllm", "0.5.3", _V, _VM + "llama.py LlamaAttention (0.5.2 derives hidden/heads)"),
        _yes("sglang", "0.3.0", _S, _SM + "llama.py LlamaAttention"),
        _never("tgi", _T, _TM + "flash_llama_modeling.py (hidden_size // num_heads)"),
        _LM_LLAMA, _TRT,
        _yes("transformers", "4.45", _HF, _TF + "llama/modeling_llama.py (4.44 derives)"),
    ),
    "mistral": (
        _yes("vllm", "0.5.3", _V, _VM + "llama.py / mistral.py LlamaAttention"),
        _yes("sglang", "0.3.0", _S, _SM + "llama.py LlamaAttention"),
        _yes("tgi", "2.2.0", _T, _TM + "flash_mistral_modeling.py, commit abc32537 (#2276)"),
        _LM_LLAMA, _TRT,
        _yes("transformers", "4.43", _HF, _TF + "mistral/modeling_mistral.py (4.42 derives)"),
    ),
    "phi3": (
        _yes("vllm", "0.5.3", _V, _VM + "llama.py (Phi3ForCausalLM is a LlamaForCausalLM)"),
        _yes("sglang", "0.3.0", _S, _SM + "llama.py Phi3ForCausalLM"),
        _never("tgi", _T, _TM + "flash_llama_modeling.py (phi3 is served by it)"),
        _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.48", _HF, _TF + "phi3/modeling_phi3.py (4.47 derives)"),
    ),
    "qwen2": (
        _never("vllm", _V, _VM + "qwen2.py Qwen2Attention: head_dim = hidden_size // total_num_heads"),
        _yes("sglang", "0.4.9", _S, _SM + "qwen2.py Qwen2Attention (0.4.8 derives)"),
        _never("tgi", _T, _TM + "flash_qwen2_modeling.py (hidden_size // num_heads)"),
        _LM_LLAMA, _TRT,
        _yes("transformers", "4.48", _HF, _TF + "qwen2/modeling_qwen2.py (4.47 derives)"),
    ),
    "qwen2-vl": (
        _never("vllm", _V, _VM + "qwen2_vl.py: its language model is Qwen2ForCausalLM (qwen2.py derives)"),
        _yes("sglang", "0.4.9", _S, _SM + "qwen2_vl.py uses qwen2.py Qwen2Model (0.4.8 derives)"),
        _never("tgi", _T, _TM + "qwen2_vl.py / qwen2_5_vl.py (hidden_size // num_heads)"),
        _unverified("lmdeploy"), _TRT,
        _never("transformers", _HF, _TF + "qwen2_vl, qwen2_5_vl modeling: Qwen2VLAttention hidden_size // num_heads"),
    ),
    "qwen2_moe": (
        _never("vllm", _V, _VM + "qwen2_moe.py Qwen2MoeAttention"),
        _never("sglang", _S, _SM + "qwen2_moe.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.53", _HF, _TF + "qwen2_moe/modeling_qwen2_moe.py (4.52.1 derives)"),
    ),
    "qwen3": (
        _yes("vllm", "0.8.5", _V, _VM + "qwen3.py (head_dim or hidden/heads; first release read with Qwen3)"),
        _yes("sglang", "0.4.6", _S, _SM + "qwen3.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.51", _HF, _TF + "qwen3/modeling_qwen3.py"),
    ),
    "qwen3_moe": (
        _yes("vllm", "0.8.5", _V, _VM + "qwen3_moe.py (first release read with it)"),
        _yes("sglang", "0.4.6", _S, _SM + "qwen3_moe.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.51", _HF, _TF + "qwen3_moe/modeling_qwen3_moe.py"),
    ),
    "gemma": (
        _yes("vllm", "0.4.3", _V, _VM + "gemma.py / gemma2.py: config.head_dim"),
        _yes("sglang", "0.3.0", _S, _SM + "gemma.py / gemma2.py: config.head_dim"),
        _yes("tgi", "1.4.2", _T, _TM + "flash_gemma_modeling.py: config.head_dim since the file was added"),
        _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.40", _HF, _TF + "gemma/modeling_gemma.py: config.head_dim"),
    ),
    "mixtral": (
        _yes("vllm", "0.8.0", _V, _VM + "mixtral.py MixtralAttention (0.7.3 derives)"),
        _never("sglang", _S, _SM + "mixtral.py MixtralAttention"),
        _never("tgi", _T, _TM + "flash_mixtral_modeling.py"),
        _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.47", _HF, _TF + "mixtral/modeling_mixtral.py (4.46 derives)"),
    ),
    "glm": (
        _yes("vllm", "0.8.5", _V, _VM + "glm4.py (Glm4ForCausalLM, first read in 0.8.5); GlmForCausalLM: glm.py "
                                        "on LlamaAttention since 0.6.6, Transformers backend in 0.33"),
        _yes("sglang", "0.5.8", _S, _SM + "glm4.py (0.5.4 derives)"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _yes("transformers", "4.48", _HF, _TF + "glm/modeling_glm.py (4.47 derives)"),
    ),
    "chatglm": (
        _never("vllm", _V, _VM + "chatglm.py GLMAttention: config.hidden_size // total_num_heads"),
        _never("sglang", _S, _SM + "chatglm.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _unverified("transformers", "remote code modeling_chatglm.py (kv_channels) not read"),
    ),
    "baichuan": (
        _never("vllm", _V, _VM + "baichuan.py (removed in 0.23.0)"),
        _never("sglang", _S, _SM + "baichuan.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _unverified("transformers", "remote code modeling_baichuan.py not read"),
    ),
    "internlm2": (
        _never("vllm", _V, _VM + "internlm2.py InternLM2Attention"),
        _never("sglang", _S, _SM + "internlm2.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _unverified("transformers", "remote code modeling_internlm2.py not read"),
    ),
    "qwen": (
        _never("vllm", _V, _VM + "qwen.py QWenAttention"),
        _never("sglang", _S, _SM + "qwen.py"),
        _unverified("tgi"), _unverified("lmdeploy"), _TRT,
        _unverified("transformers", "remote code modeling_qwen.py not read"),
    ),
}
QWEN2_VL_ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
# vLLM >= 0.7.0 llama.py reads `qkv_bias` (added for InternLM3), so a Qwen2 checkpoint can be loaded through
# LlamaForCausalLM, which honours head_dim. Read in the code, not run.
QWEN2_VLLM_WORKAROUND = (
    "vLLM's Qwen2 model ignores head_dim; vLLM >= 0.7.0 may load it as Llama instead: "
    "--hf-overrides '{\"architectures\": [\"LlamaForCausalLM\"], \"qkv_bias\": true, \"attention_bias\": false}' "
    "(inferred from vllm llama.py, not run)"
)


def support_key(ckpt: Checkpoint) -> str:
    fam = ckpt.family.name
    if fam == "qwen2" and (ckpt.config.architecture in QWEN2_VL_ARCHS or ckpt.config.wrapper_architecture in QWEN2_VL_ARCHS):
        return "qwen2-vl"
    if fam == "llama" and ckpt.config.model_type == "mistral":
        return "mistral"
    return fam


def engine_support(ckpt: Checkpoint, engines=None) -> tuple[HeadDimSupport, ...]:
    """HeadDimSupport of this architecture for the runtimes behind `engines` (all if None) + transformers."""
    table = HEAD_DIM_SUPPORT.get(support_key(ckpt), ())
    wanted = None if engines is None else {ENGINE_RUNTIME.get(e, e) for e in _engines(engines)} | {"transformers"}
    return tuple(s for s in table if wanted is None or s.engine in wanted)


# --- rule checks with a hypothetical head count ----------------------------------------------------


def _engines(engines) -> tuple[str, ...]:
    return (engines,) if isinstance(engines, str) else tuple(engines)


def attention_violations(ckpt: Checkpoint, engine: str, t: int, heads: int | None = None,
                         kv_heads: int | None = None, head_dim: int | None = None) -> list[Violation]:
    """The attention rules of `engine` (quantities heads, kv_heads, attn.K_r, attn.N_r) at TP t, evaluated
    for a hypothetical (heads, kv_heads, head_dim); None = the checkpoint's own. Mirrors rules.evaluate."""
    dims = ckpt.dims
    heads = dims.heads if heads is None else heads
    kv = (dims.kv_heads if kv_heads is None else kv_heads) or heads
    d = dims.head_dim if head_dim is None else head_dim
    out = []

    def fail(rule, value, m, explanation):
        text = rule.message.format(value=value, t=t, m=m)
        return Violation(engine, t, rule.id, rule.quantity, value, m, rule.severity, False, text, explanation, rule.source)

    for rule in ENGINES[engine]:
        q = rule.quantity
        if q not in HEAD_QUANTITIES or rule.any_of:
            continue
        if q == "heads":
            if heads and heads % t:
                out.append(fail(rule, heads, t, f"{heads} attention heads do not split over {t} GPUs"))
        elif q == "kv_heads":
            if kv and not ckpt.family.mla:
                ok = (kv % t == 0 or t % kv == 0) if rule.multiple == "kv-replicate" else kv % t == 0
                if not ok:
                    out.append(fail(rule, kv, t, f"{kv} KV heads neither divide nor are divided by TP {t}"))
        else:
            part = q.split(".")[1]
            subject = attn_subject(ckpt, part)
            if subject is None or not applies(rule, subject) or not heads or heads % t:
                continue
            m = multiple_of(rule, t, subject.group, subject.bits)
            if part == "K_r":
                value = heads * (d or 0) / t
            else:
                value = (heads // t + 2 * max(1, kv // t)) * (d or 0)
            if value != int(value) or int(value) % m:
                what = "o_proj input" if part == "K_r" else "merged qkv output"
                shown = int(value) if float(value).is_integer() else round(value, 3)
                out.append(fail(rule, shown, m, f"per-rank {what} {shown} is not a multiple of {m} "
                                                "(needs attention-head padding)"))
    return out


def evaluate_with_heads(ckpt: Checkpoint, engine: str, t: int, widths: dict[str, int] | None = None,
                        heads: int | None = None, kv_heads: int | None = None) -> list[Violation]:
    """rules.evaluate with MLP widths AND head counts overridden: what `plan`/`verify` should use after
    head padding (the checkpoint's attention quantities are replaced by the hypothetical ones)."""
    base = [v for v in evaluate(ckpt, engine, t, widths) if v.quantity not in HEAD_QUANTITIES]
    return base + attention_violations(ckpt, engine, t, heads, kv_heads)


def head_violations(ckpt: Checkpoint, tps, engines) -> list[Violation]:
    """Every attention-rule error of the unpadded checkpoint at the requested TPs."""
    return [v for e in _engines(engines) for t in tps for v in attention_violations(ckpt, e, t) if v.severity == "error"]


# --- refusals ---------------------------------------------------------------------------------


def _alibi_reason(ckpt: Checkpoint) -> str | None:
    cfg, mt = ckpt.config.text, ckpt.config.model_type
    attn_cfg = cfg.get("attn_config") if isinstance(cfg.get("attn_config"), dict) else {}
    if cfg.get("alibi") or cfg.get("use_alibi") or attn_cfg.get("alibi") or cfg.get("position_embedding_type") == "alibi":
        return "config.json enables ALiBi"
    if mt in ("bloom", "mpt"):
        return f"model_type {mt} uses ALiBi"
    if ckpt.family.name == "baichuan" and ckpt.config.architecture != "BaiChuanForCausalLM" and cfg.get("hidden_size") != 4096:
        return "Baichuan 13B models use ALiBi (vLLM baichuan.py: hidden_size != 4096 -> ALIBI)"
    return None


def attention_linears(ckpt: Checkpoint) -> dict[int, dict[str, Linear]]:
    """layer -> {role: Linear} of the attention projections (q, k, v, o or qkv, o)."""
    layers: dict[int, dict[str, Linear]] = defaultdict(dict)
    for lin in ckpt.linears:
        if lin.block == "attn":
            layers[lin.layer][lin.role] = lin
    return dict(sorted(layers.items()))


def check_paddable(ckpt: Checkpoint) -> None:
    """Raise UnsupportedError (one line) if head padding of this checkpoint would not be exact / is unknown."""
    fam = ckpt.family
    if fam.mla:
        raise UnsupportedError(f"{ckpt.config.architecture}: multi-head latent attention (MLA) heads cannot be padded")
    if not ckpt.family_known:
        raise UnsupportedError(
            f"unknown architecture {ckpt.config.architecture or ckpt.config.model_type!r}: awqpad pads attention heads "
            "only for architectures whose attention it knows (per-head parameters, RoPE, head_dim handling)")
    reason = _alibi_reason(ckpt)
    if reason:
        raise UnsupportedError(f"{reason}: ALiBi slopes depend on the number of heads, so added heads change every head")
    dims = ckpt.dims
    h, kv, d = dims.heads, dims.kv_heads, dims.head_dim
    if not h or not kv or not d:
        raise UnsupportedError("the attention head count, KV head count or head_dim is missing from config.json")
    if h % kv:
        raise UnsupportedError(f"{h} attention heads are not a multiple of {kv} KV heads")
    layers = attention_linears(ckpt)
    if not layers:
        raise UnsupportedError("no attention projections recognised: nothing to pad")
    for layer, roles in layers.items():
        if "o" not in roles or not ({"q", "k", "v"} <= roles.keys() or "qkv" in roles) or "mla" in roles:
            raise UnsupportedError(f"layer {layer}: attention projections {sorted(roles)} are not q/k/v/o or fused qkv/o")
        o = roles["o"]
        want_qkv = (h + 2 * kv) * d
        sizes = ({"q": roles["q"].out_features, "k": roles["k"].out_features, "v": roles["v"].out_features}
                 if "q" in roles else {"qkv": roles["qkv"].out_features})
        expect = {"q": h * d, "k": kv * d, "v": kv * d, "qkv": want_qkv}
        bad = {r: n for r, n in sizes.items() if n != expect[r]}
        if bad or o.in_features != h * d:
            raise UnsupportedError(
                f"layer {layer}: projection sizes {bad or {'o.in': o.in_features}} do not match {h} heads x "
                f"{kv} KV heads x head_dim {d} from config.json")
        for lin in roles.values():
            if lin.quantized and lin.group_size == -1 and lin.role == "o":
                raise UnsupportedError(f"{lin.prefix}: per-channel quantized o_proj cannot take zero input rows "
                                       "(its one scale group cannot be 0)")
        if o.quantized and o.group_size and o.group_size > 0 and d % o.group_size:
            raise UnsupportedError(
                f"{o.prefix}: head_dim {d} is not a multiple of the quantization group size {o.group_size}, so a "
                "zero head's o_proj input rows would share a scale group with a real head; head padding needs "
                "head_dim % group_size == 0 for a quantized o_proj")
    _check_attention_tensors(ckpt, layers, d)


def _check_attention_tensors(ckpt: Checkpoint, layers: dict[int, dict[str, Linear]], d: int) -> None:
    modules = {roles["o"].prefix.rpartition(".")[0] for roles in layers.values()}
    linear_prefixes = {lin.prefix for roles in layers.values() for lin in roles.values()}
    for name, info in ckpt.tensors.items():
        prefix = name.rpartition(".")[0]
        if prefix in linear_prefixes:
            continue
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if owner is None:
            continue
        leaf = name[len(owner) + 1:]
        if leaf.endswith("inv_freq"):
            continue
        if leaf.split(".")[0] in NORM_NAMES:
            if tuple(info.shape) != (d,):
                raise UnsupportedError(
                    f"{name} has shape {list(info.shape)}: a q/k norm over more than one head mixes heads, so zero "
                    "heads would change it (only per-head_dim norms, as in Qwen3, are exact)")
            continue
        raise UnsupportedError(
            f"{name} {list(info.shape)}: attention parameter awqpad does not know how to pad for new heads "
            "(per-head parameters such as attention sinks are not handled)")


# --- choosing the head count ------------------------------------------------------------------


def _valid(ckpt, engines, tps, h2, k2) -> bool:
    return not any(v.severity == "error" for e in engines for t in tps for v in attention_violations(ckpt, e, t, h2, k2))


def choose_heads(ckpt: Checkpoint, tps, engines) -> tuple[int, int] | None:
    """Smallest (heads', kv_heads') with heads' = kv' * r', kv' >= kv, r' >= r that passes every attention rule
    of every engine at every TP; ties go to the fewest KV heads (no KV-cache growth). None: none up to MAX_GROWTH x."""
    h, kv = ckpt.dims.heads, ckpt.dims.kv_heads
    r = h // kv
    engines = _engines(engines)
    for h2 in range(h, MAX_GROWTH * h + 1):
        for k2 in range(kv, h2 // r + 1):
            if h2 % k2 == 0 and _valid(ckpt, engines, tps, h2, k2):
                return h2, k2
    return None


def strategy_name(h: int, kv: int, h2: int, k2: int) -> str:
    if (h2, k2) == (h, kv):
        return "none"
    r, r2 = h // kv, h2 // k2
    if kv == 1 and k2 == 1 or kv == h and k2 == h2:
        return "append"
    if k2 == kv:
        return "insert-in-groups"
    if r2 == r:
        return "new-kv-groups"
    return "insert-in-groups+new-kv-groups"


def head_map(h: int, kv: int, h2: int, k2: int) -> tuple[int, ...]:
    """New index of each original query head: head i of group i // r keeps its place inside its group."""
    r, r2 = h // kv, h2 // k2
    return tuple((i // r) * r2 + i % r for i in range(h))


# --- tensor operations ------------------------------------------------------------------------


def _merge(inserts: list[tuple[int, int]]) -> tuple[LogicalInsert, ...]:
    by_at: dict[int, int] = defaultdict(int)
    for at, count in inserts:
        if count:
            by_at[at] += count
    return tuple(LogicalInsert(at, c) for at, c in sorted(by_at.items()))


def q_inserts(h: int, kv: int, h2: int, k2: int, d: int, offset: int = 0) -> tuple[LogicalInsert, ...]:
    """Feature inserts on a [heads * d] axis (q_proj outputs, o_proj inputs)."""
    r, r2 = h // kv, h2 // k2
    ins = [(offset + (j + 1) * r * d, (r2 - r) * d) for j in range(kv)]
    ins.append((offset + h * d, (k2 - kv) * r2 * d))
    return _merge(ins)


def kv_inserts(kv: int, k2: int, d: int, offset: int = 0) -> tuple[LogicalInsert, ...]:
    return _merge([(offset + kv * d, (k2 - kv) * d)])


def qkv_inserts(layout: str, h: int, kv: int, h2: int, k2: int, d: int) -> tuple[LogicalInsert, ...]:
    """Output inserts of a fused qkv projection: "fused" = [q; k; v], "grouped" = InternLM2 [(q.., k, v) per group]."""
    if layout == "fused":
        return _merge([(i.at, i.count) for i in q_inserts(h, kv, h2, k2, d)]
                      + [(i.at, i.count) for i in kv_inserts(kv, k2, d, h * d)]
                      + [(i.at, i.count) for i in kv_inserts(kv, k2, d, (h + kv) * d)])
    r, r2 = h // kv, h2 // k2
    size = (r + 2) * d
    ins = [(j * size + r * d, (r2 - r) * d) for j in range(kv)]
    ins.append((kv * size, (k2 - kv) * (r2 + 2) * d))
    return _merge(ins)


def qkv_layout(ckpt: Checkpoint) -> str:
    return "grouped" if ckpt.family.name in GROUPED_QKV else "fused"


def layer_ops(ckpt: Checkpoint, roles: dict[str, Linear], h2: int, k2: int) -> list[TensorOp]:
    dims = ckpt.dims
    h, kv, d = dims.heads, dims.kv_heads, dims.head_dim
    ops: list[TensorOp] = []
    for role, lin in roles.items():
        fmt = formats.BY_NAME[lin.format]
        try:
            if role == "q":
                ins, axis = q_inserts(h, kv, h2, k2, d), "out"
            elif role in ("k", "v"):
                ins, axis = kv_inserts(kv, k2, d), "out"
            elif role == "qkv":
                ins, axis = qkv_inserts(qkv_layout(ckpt), h, kv, h2, k2, d), "out"
            elif role == "o":
                ins, axis = q_inserts(h, kv, h2, k2, d), "in"
            else:
                continue
            if ins:
                ops += fmt.pad_ops(lin, axis, ins)
        except UnsupportedError as exc:
            raise UnsupportedError(f"head padding: {exc.message}") from None
    return ops


def head_ops(ckpt: Checkpoint, new_heads: int, new_kv_heads: int) -> tuple[TensorOp, ...]:
    """Every attention tensor op taking this checkpoint to (new_heads, new_kv_heads) -- e.g. for verify to
    re-derive what `pad` must have written from OUT's head counts."""
    return tuple(op for roles in attention_linears(ckpt).values() for op in layer_ops(ckpt, roles, new_heads, new_kv_heads))


def _config_updates(ckpt: Checkpoint, h2: int, k2: int) -> dict[str, int]:
    keys, cfg = ckpt.family.keys, ckpt.config
    heads_key, kv_key, hd_key = keys.get("heads"), keys.get("kv_heads"), keys.get("head_dim")
    nodes = []  # where the language model's attention keys live: the text config and/or the top level
    if cfg.text_path and heads_key in cfg.text:
        nodes.append(cfg.text_path)
    if heads_key in cfg.raw or not nodes:
        nodes.append(())
    mha_implicit = ckpt.family.name == "chatglm" and not cfg.get("multi_query_attention", False)
    out: dict[str, int] = {}
    for node_path in nodes:
        node = cfg.raw
        for key in node_path:
            node = node[key]

        def put(key, value):
            out[".".join(node_path + (key,))] = value

        if node.get(heads_key) != h2:
            put(heads_key, h2)
        if kv_key and not mha_implicit and (kv_key in node or k2 != h2) and node.get(kv_key) != k2:
            put(kv_key, k2)
        if hd_key and node.get(hd_key) != ckpt.dims.head_dim:
            put(hd_key, ckpt.dims.head_dim)
    return out


def _op_bytes(op: TensorOp) -> int:
    return tensor_nbytes(op.dtype, op.new_shape) - tensor_nbytes(op.dtype, op.old_shape)


# --- the planner ------------------------------------------------------------------------------


def plan_heads(ckpt: Checkpoint, tps, engines, *, allow_ignored_head_dim: bool = False) -> HeadPlan | HeadBlocker:
    """The smallest exact attention-head padding that makes every selected engine's attention rules hold at
    every TP in `tps`.

    Returns a HeadPlan (strategy "none" and no ops when the heads already split), or a HeadBlocker when no
    head count up to MAX_GROWTH x works, or when a selected engine ignores config head_dim for this
    architecture in every release read (unless allow_ignored_head_dim: then the plan lists it in
    `unsupported_engines`). Raises UnsupportedError when head padding would not be exact (ALiBi, MLA,
    unknown per-head parameters, quantized o_proj with head_dim % group_size != 0, ...).
    """
    engines = _engines(engines)
    tps = tuple(sorted(set(tps)))
    dims = ckpt.dims
    h, kv, d = dims.heads, dims.kv_heads, dims.head_dim
    before = head_violations(ckpt, tps, engines)
    support = engine_support(ckpt)  # every runtime read, for plan / verify / the model card
    if not before:
        return HeadPlan(ckpt.family.name, ckpt.config.architecture, "none", h or 0, h or 0, kv or 0, kv or 0, d or 0,
                        0, (), {}, (), engine_support=support)
    check_paddable(ckpt)
    chosen = choose_heads(ckpt, tps, engines)
    worst = max(before, key=lambda v: v.tp)
    if chosen is None:
        return HeadBlocker(worst.engine, worst.tp, worst.rule,
                           f"no head count up to {MAX_GROWTH} x {h} satisfies the attention rules at TP {list(tps)}",
                           worst.explanation)
    h2, k2 = chosen
    ignoring = tuple(e for e in engines
                     if any(s.engine == ENGINE_RUNTIME.get(e, e) and s.status == "never" for s in support))
    if ignoring and not allow_ignored_head_dim:
        s = next(s for s in support if s.engine == ENGINE_RUNTIME.get(ignoring[0], ignoring[0]))
        others = [x.text for x in support if x.status == "yes"]
        hint = f"; {QWEN2_VLLM_WORKAROUND}" if support_key(ckpt) == "qwen2" and s.engine == "vllm" else ""
        return HeadBlocker(
            ",".join(ignoring), worst.tp, "head-dim-ignored",
            f"{ENGINE_LABEL.get(s.engine, s.engine)} ignores config head_dim for {ckpt.config.architecture} "
            f"({s.source}; read {s.checked}), so {h} -> {h2} padded heads would not load",
            "head_dim is read by: " + ("; ".join(others) if others else "no engine read") + hint)
    layers = attention_linears(ckpt)
    ops = head_ops(ckpt, h2, k2)
    attn_bytes = sum(lin.nbytes for roles in layers.values() for lin in roles.values())
    notes = []
    if ignoring:
        notes.append(f"{', '.join(ignoring)}: ignores config head_dim for this architecture; the padded model will not load there")
        if support_key(ckpt) == "qwen2" and "vllm" in {ENGINE_RUNTIME.get(e, e) for e in ignoring}:
            notes.append(QWEN2_VLLM_WORKAROUND)
    if k2 != kv:
        notes.append(f"KV heads {kv} -> {k2}: the KV cache grows by {100 * (k2 - kv) / kv:.1f} %")
    return HeadPlan(
        family=ckpt.family.name,
        architecture=ckpt.config.architecture,
        strategy=strategy_name(h, kv, h2, k2),
        heads=h, new_heads=h2, kv_heads=kv, new_kv_heads=k2, head_dim=d,
        layers=len(layers),
        reasons=tuple(sorted({v.rule for v in before})),
        config_updates=_config_updates(ckpt, h2, k2),
        ops=ops,
        added_bytes=sum(map(_op_bytes, ops)),
        attention_bytes=attn_bytes,
        proj_flops_increase=((2 * h2 + 2 * k2) - (2 * h + 2 * kv)) / (2 * h + 2 * kv),
        core_flops_increase=(h2 - h) / h,
        kv_cache_increase=(k2 - kv) / kv,
        engine_support=support,
        unsupported_engines=ignoring,
        notes=tuple(notes),
    )


def caveat_markdown(plan: HeadPlan) -> str:
    """Model-card / README paragraph: which engine versions read config head_dim for this architecture."""
    lines = [f"Attention heads were padded {plan.heads} -> {plan.new_heads} (KV heads {plan.kv_heads} -> "
             f"{plan.new_kv_heads}); `head_dim` = {plan.head_dim} is now written explicitly because "
             "hidden_size / num_attention_heads no longer gives it. Engines that derive head_dim from hidden_size "
             "cannot load this checkpoint. Minimum versions that read `head_dim` for "
             f"{plan.architecture}:", ""]
    lines += [f"- {s.text}" for s in plan.engine_support]
    return "\n".join(lines) + "\n"


def padded_heads_ok(ckpt: Checkpoint, tps, engines, heads: int, kv_heads: int) -> bool:
    """True if (heads, kv_heads) passes every attention rule (for verify of a padded output)."""
    return _valid(ckpt, _engines(engines), tuple(tps), heads, kv_heads)


__all__ = [
    "HeadPlan", "HeadBlocker", "HeadDimSupport", "HEAD_DIM_SUPPORT", "HEAD_QUANTITIES", "HEAD_RULES",
    "plan_heads", "choose_heads", "check_paddable", "attention_violations", "evaluate_with_heads",
    "head_violations", "engine_support", "head_map", "q_inserts", "kv_inserts", "qkv_inserts", "layer_ops", "head_ops",
    "attention_linears",
    "strategy_name", "caveat_markdown", "padded_heads_ok", "support_key",
]
