"""Which engine releases size attention from config.json `head_dim`, per architecture, as data.

After head padding, hidden_size / num_attention_heads no longer gives head_dim, so the padded checkpoint
loads only where the engine reads config `head_dim` for that architecture. HEAD_DIM_SUPPORT records, per
architecture and engine, the first release read that does; each row names the engine source file it mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass

from awqpad.checkpoint.model import Checkpoint
from awqpad.engines.evaluate import engine_names

HEAD_DIM_IGNORED = "head-dim-ignored"  # blocker rule id: a selected engine ignores config head_dim


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
    wanted = None if engines is None else {ENGINE_RUNTIME.get(e, e) for e in engine_names(engines)} | {"transformers"}
    return tuple(s for s in table if wanted is None or s.engine in wanted)


def engines_ignoring_head_dim(support: tuple[HeadDimSupport, ...], engines) -> tuple[str, ...]:
    """The engine profiles in `engines` whose runtime ignores config head_dim in every release read."""
    return tuple(e for e in engine_names(engines)
                 if any(s.engine == ENGINE_RUNTIME.get(e, e) and s.status == "never" for s in support))


def runtime_support(support: tuple[HeadDimSupport, ...], engine: str) -> HeadDimSupport:
    """The HeadDimSupport row of the runtime behind engine profile `engine`."""
    return next(s for s in support if s.engine == ENGINE_RUNTIME.get(engine, engine))
