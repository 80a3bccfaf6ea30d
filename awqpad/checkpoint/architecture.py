"""Architecture knowledge as data: module-name patterns and config keys per model family.

A pattern is a regex matched against the END of a module prefix (the tensor name without its last
component), so wrapper prefixes (`model.`, `language_model.model.`, `model.language_model.`) need no
special casing. `{L}` stands for the layer index, `{E}` for the expert index.
Each family entry names the Hugging Face modeling code it was read from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

# role -> (tensor-parallel style, the dimension TP splits). "fused" roles hold several column
# blocks (gate||up, q||k||v) in one tensor.
ROLES = MappingProxyType(
    {
        "q": "column", "k": "column", "v": "column", "qkv": "column", "o": "row",
        "gate": "column", "up": "column", "gate_up": "column", "down": "row",
        "mla": "column",  # DeepSeek MLA low-rank projections: never padded
        "linear_in": "column",  # Qwen3-Next Gated DeltaNet in_proj_qkvz / in_proj_ba: never padded
        "linear_out": "row",  # Gated DeltaNet out_proj: never padded
        "router": "replicated",
    }
)


@dataclass(frozen=True)
class Pattern:
    regex: str  # with {L} / {E}; anchored at the end of the module prefix
    role: str
    block: str  # "attn" | "dense" | "expert" | "shared" | "router"

    def compile(self) -> re.Pattern:
        body = self.regex.replace("{L}", r"(?P<layer>\d+)").replace("{E}", r"(?P<expert>\d+)")
        return re.compile(r"(?:^|\.)" + body + "$")


def _p(regex: str, role: str, block: str) -> Pattern:
    return Pattern(regex, role, block)


# Pattern groups, each commented with the families that use it.
ATTN_QKVO = (  # Llama, Mistral, Qwen2/2.5/3, Gemma/Gemma2, Yi, Mixtral, Qwen-MoE, GLM-4 (HF native)
    _p(r"layers\.{L}\.self_attn\.q_proj", "q", "attn"),
    _p(r"layers\.{L}\.self_attn\.k_proj", "k", "attn"),
    _p(r"layers\.{L}\.self_attn\.v_proj", "v", "attn"),
    _p(r"layers\.{L}\.self_attn\.o_proj", "o", "attn"),
)
ATTN_PHI3 = (  # Phi-3 / Phi-4
    _p(r"layers\.{L}\.self_attn\.qkv_proj", "qkv", "attn"),
    _p(r"layers\.{L}\.self_attn\.o_proj", "o", "attn"),
)
ATTN_BAICHUAN = (  # Baichuan2 (W_pack = fused qkv)
    _p(r"layers\.{L}\.self_attn\.W_pack", "qkv", "attn"),
    _p(r"layers\.{L}\.self_attn\.o_proj", "o", "attn"),
)
ATTN_INTERNLM2 = (  # InternLM2 (wqkv is grouped per KV head)
    _p(r"layers\.{L}\.attention\.wqkv", "qkv", "attn"),
    _p(r"layers\.{L}\.attention\.wo", "o", "attn"),
)
ATTN_CHATGLM = (  # ChatGLM2/3, GLM-4 (THUDM remote code)
    _p(r"layers\.{L}\.self_attention\.query_key_value", "qkv", "attn"),
    _p(r"layers\.{L}\.self_attention\.dense", "o", "attn"),
)
ATTN_QWEN1 = (  # Qwen (v1) remote code
    _p(r"h\.{L}\.attn\.c_attn", "qkv", "attn"),
    _p(r"h\.{L}\.attn\.c_proj", "o", "attn"),
)
ATTN_MLA = (  # DeepSeek-V2/V3 multi-head latent attention: low-rank projections are left alone
    _p(r"layers\.{L}\.self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)", "mla", "attn"),
    _p(r"layers\.{L}\.self_attn\.o_proj", "o", "attn"),
)
MLP_GATED = (  # Llama family, Qwen2/3, Gemma, Mistral, DeepSeek dense layers
    _p(r"layers\.{L}\.mlp\.gate_proj", "gate", "dense"),
    _p(r"layers\.{L}\.mlp\.up_proj", "up", "dense"),
    _p(r"layers\.{L}\.mlp\.down_proj", "down", "dense"),
)
MLP_FUSED = (  # Phi-3/Phi-4, GLM-4 HF native: gate_up_proj = gate || up
    _p(r"layers\.{L}\.mlp\.gate_up_proj", "gate_up", "dense"),
    _p(r"layers\.{L}\.mlp\.down_proj", "down", "dense"),
)
MLP_INTERNLM2 = (  # InternLM2: w1 = gate, w3 = up, w2 = down
    _p(r"layers\.{L}\.feed_forward\.w1", "gate", "dense"),
    _p(r"layers\.{L}\.feed_forward\.w3", "up", "dense"),
    _p(r"layers\.{L}\.feed_forward\.w2", "down", "dense"),
)
MLP_CHATGLM = (  # ChatGLM: dense_h_to_4h = gate || up (swiglu chunks it in two)
    _p(r"layers\.{L}\.mlp\.dense_h_to_4h", "gate_up", "dense"),
    _p(r"layers\.{L}\.mlp\.dense_4h_to_h", "down", "dense"),
)
MLP_QWEN1 = (  # Qwen (v1): w2 * silu(w1)... c_proj = down; both w1/w2 are [I/2, H]
    _p(r"h\.{L}\.mlp\.w1", "up", "dense"),
    _p(r"h\.{L}\.mlp\.w2", "gate", "dense"),
    _p(r"h\.{L}\.mlp\.c_proj", "down", "dense"),
)
MOE_QWEN = (  # Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 routed experts and routers
    _p(r"layers\.{L}\.mlp\.experts\.{E}\.gate_proj", "gate", "expert"),
    _p(r"layers\.{L}\.mlp\.experts\.{E}\.up_proj", "up", "expert"),
    _p(r"layers\.{L}\.mlp\.experts\.{E}\.down_proj", "down", "expert"),
    _p(r"layers\.{L}\.mlp\.gate", "router", "router"),
)
SHARED_QWEN2_MOE = (  # Qwen2-MoE single shared expert (+ its sigmoid gate)
    _p(r"layers\.{L}\.mlp\.shared_expert\.gate_proj", "gate", "shared"),
    _p(r"layers\.{L}\.mlp\.shared_expert\.up_proj", "up", "shared"),
    _p(r"layers\.{L}\.mlp\.shared_expert\.down_proj", "down", "shared"),
    _p(r"layers\.{L}\.mlp\.shared_expert_gate", "router", "router"),
)
SHARED_DEEPSEEK = (  # DeepSeek-V2/V3 shared experts (one MLP of width n_shared_experts * Ie)
    _p(r"layers\.{L}\.mlp\.shared_experts\.gate_proj", "gate", "shared"),
    _p(r"layers\.{L}\.mlp\.shared_experts\.up_proj", "up", "shared"),
    _p(r"layers\.{L}\.mlp\.shared_experts\.down_proj", "down", "shared"),
)
MOE_MIXTRAL = (  # Mixtral: w1 = gate, w3 = up, w2 = down
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w1", "gate", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w3", "up", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w2", "down", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.gate", "router", "router"),
)
MOE_MINIMAX = (  # MiniMax-M2 (HF checkpoint names): Mixtral-style w1/w3/w2 experts, sigmoid router
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w1", "gate", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w3", "up", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.experts\.{E}\.w2", "down", "expert"),
    _p(r"layers\.{L}\.block_sparse_moe\.gate", "router", "router"),
)
LINEAR_ATTN_QWEN3_NEXT = (  # Qwen3-Next Gated DeltaNet layers (every layer but each full_attention_interval-th)
    _p(r"layers\.{L}\.linear_attn\.(?:in_proj_qkvz|in_proj_ba)", "linear_in", "attn"),
    _p(r"layers\.{L}\.linear_attn\.out_proj", "linear_out", "attn"),
)

# Modules under these prefixes belong to vision towers / projectors and are never touched.
VISION_PREFIXES = re.compile(
    r"(?:^|\.)(?:visual|vision_tower|vision_model|vision_encoder|vit|mlp1|multi_modal_projector|"
    r"mm_projector|merger|audio_tower)\."
)


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    # semantic dimension -> config.json key (None: not in config / derived)
    keys: MappingProxyType
    source: str  # where the names were read
    dense_key_factor: int = 1  # Qwen v1 stores intermediate_size = 2 x projection width
    mla: bool = False
    # DeepSeek: the shared experts' width is not in config.json; engines derive it as
    # n_shared_experts x moe_intermediate_size, so padding one pads the other.
    shared_factor_key: str | None = None


def _keys(**overrides) -> MappingProxyType:
    base = {
        "hidden": "hidden_size",
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "dense": "intermediate_size",
        "expert": "moe_intermediate_size",
        "shared": "shared_expert_intermediate_size",
    }
    base.update(overrides)
    return MappingProxyType(base)


FAMILIES = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM", "YiForCausalLM"), ("llama", "mistral", "yi"),
           ATTN_QKVO + MLP_GATED, _keys(), "transformers models/llama, models/mistral"),
    Family("qwen2", ("Qwen2ForCausalLM", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
           ("qwen2", "qwen2_vl", "qwen2_5_vl"), ATTN_QKVO + MLP_GATED, _keys(),
           "transformers models/qwen2, models/qwen2_vl, models/qwen2_5_vl"),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), ATTN_QKVO + MLP_GATED, _keys(), "transformers models/qwen3"),
    Family("gemma", ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"), ("gemma", "gemma2", "gemma3_text"),
           ATTN_QKVO + MLP_GATED, _keys(), "transformers models/gemma, models/gemma2"),
    Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), ATTN_QKVO + MOE_MIXTRAL,
           _keys(expert="intermediate_size", dense=None, shared=None), "transformers models/mixtral"),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",),
           ATTN_QKVO + MLP_GATED + MOE_QWEN + SHARED_QWEN2_MOE, _keys(), "transformers models/qwen2_moe"),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), ATTN_QKVO + MLP_GATED + MOE_QWEN,
           _keys(shared=None), "transformers models/qwen3_moe"),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), ATTN_PHI3 + MLP_FUSED, _keys(), "transformers models/phi3"),
    Family("internlm2", ("InternLM2ForCausalLM",), ("internlm2",), ATTN_INTERNLM2 + MLP_INTERNLM2, _keys(),
           "internlm/internlm2 modeling_internlm2.py"),
    Family("deepseek_v2", ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"), ("deepseek_v2", "deepseek_v3"),
           ATTN_MLA + MLP_GATED + MOE_QWEN + SHARED_DEEPSEEK, _keys(shared=None, kv_heads=None, head_dim=None),
           "transformers models/deepseek_v2, models/deepseek_v3", mla=True, shared_factor_key="n_shared_experts"),
    Family("minimax_m2", ("MiniMaxM2ForCausalLM",), ("minimax_m2",), ATTN_QKVO + MOE_MINIMAX,
           _keys(expert="intermediate_size", dense=None, shared=None),
           "transformers models/minimax_m2; MiniMaxAI/MiniMax-M2 checkpoint names (block_sparse_moe.experts.N.w1/w3/w2)"),
    Family("glm4_moe", ("Glm4MoeForCausalLM",), ("glm4_moe",), ATTN_QKVO + MLP_GATED + MOE_QWEN + SHARED_DEEPSEEK,
           _keys(shared=None), "transformers models/glm4_moe (Glm4MoeMoE: shared_experts width = "
           "moe_intermediate_size * n_shared_experts)", shared_factor_key="n_shared_experts"),
    Family("qwen3_next", ("Qwen3NextForCausalLM",), ("qwen3_next",),
           ATTN_QKVO + LINEAR_ATTN_QWEN3_NEXT + MLP_GATED + MOE_QWEN + SHARED_QWEN2_MOE, _keys(),
           "transformers models/qwen3_next (Qwen3NextSparseMoeBlock, Qwen3NextGatedDeltaNet)"),
    Family("chatglm", ("ChatGLMModel", "ChatGLMForConditionalGeneration"), ("chatglm",), ATTN_CHATGLM + MLP_CHATGLM,
           _keys(layers="num_layers", kv_heads="multi_query_group_num", head_dim="kv_channels", dense="ffn_hidden_size",
                 expert=None, shared=None), "THUDM/glm-4-9b-chat modeling_chatglm.py"),
    Family("glm", ("GlmForCausalLM", "Glm4ForCausalLM"), ("glm", "glm4"), ATTN_QKVO + MLP_FUSED, _keys(),
           "transformers models/glm, models/glm4"),
    Family("baichuan", ("BaichuanForCausalLM",), ("baichuan",), ATTN_BAICHUAN + MLP_GATED, _keys(),
           "baichuan-inc/Baichuan2 modeling_baichuan.py"),
    Family("qwen", ("QWenLMHeadModel",), ("qwen",), ATTN_QWEN1 + MLP_QWEN1, _keys(kv_heads=None, head_dim="kv_channels"),
           "Qwen/Qwen-7B modeling_qwen.py", dense_key_factor=2),
)

# Unknown architectures: every pattern above (they do not collide), default keys.
GENERIC = Family(
    "generic",
    (),
    (),
    tuple(dict.fromkeys(p for fam in FAMILIES if not fam.mla for p in fam.patterns)),
    _keys(),
    "union of all families",
)


def find_family(architecture: str, model_type: str, wrapper: str | None = None) -> tuple[Family, bool]:
    """The family for a config (known=True), or GENERIC (known=False)."""
    for fam in FAMILIES:
        if architecture in fam.hf_architectures or (wrapper and wrapper in fam.hf_architectures):
            return fam, True
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam, True
    return GENERIC, False


def compile_patterns(family: Family) -> tuple[tuple[re.Pattern, Pattern], ...]:
    return tuple((p.compile(), p) for p in family.patterns)
