"""SGLang's per-rank rules (python/sglang/srt/layers/quantization/...): the classic vLLM code, copied.

AWQ is read in full (awq/awq.py, awq/schemes/*). GPTQ dense discards its Marlin shape check
(gptq_kernels.py) and GPTQ MoE has no shape gate; compressed-tensors MoE was not read: their rows are the
AWQ ones, a conservative guess (../shared/reference/engine-constraints.md section 2).
"""

from __future__ import annotations

from awqpad.engines.rules import AWQ_IN, INT_FORMATS, MARLIN_K, MARLIN_N, Rule
from awqpad.engines.vllm import COMMON, MARLIN_GROUPS

MOE_FALLBACK = "Layer '<prefix>.mlp.experts' is not supported by AWQMoeMarlin. Falling back to Moe WNA16 kernels. (per-rank expert width {value} is not a multiple of {m})"

SGLANG = COMMON + MARLIN_GROUPS + tuple(  # marlin_utils.py copies MARLIN_SUPPORTED_GROUP_SIZES
    rule
    for kind in ("dense", "shared")
    for rule in (
        Rule(f"{kind}-down-groups", f"{kind}.K_r", "group", AWQ_IN, "sglang awq/schemes/awq_linear.py create_weights", True,
             formats=INT_FORMATS, path="awq"),
        Rule(f"{kind}-down-marlin-k", f"{kind}.K_r", "lcm(group,128)", MARLIN_K, "sglang marlin_utils.py verify_marlin_supports_shape", True,
             formats=INT_FORMATS, path="marlin"),
        Rule(f"{kind}-gate-up-marlin-n", f"{kind}.N_r", "64", MARLIN_N, "sglang marlin_utils.py verify_marlin_supports_shape", True,
             formats=INT_FORMATS, path="marlin"),
    )
) + (
    Rule("attn-o-groups", "attn.K_r", "lcm(group,128)", MARLIN_K, "sglang marlin_utils.py verify_marlin_supports_shape on o_proj", True,
         formats=INT_FORMATS, path="marlin"),
    Rule("expert-marlin", "expert.K_r", "max(64,group)", MOE_FALLBACK, "sglang awq/awq.py check_moe_marlin_supports_layer", True,
         "fallback", formats=INT_FORMATS, path="moe-marlin", fallback_to="moe-wna16"),
    Rule("expert-hidden", "hidden", "128", "MoE Marlin needs hidden_size % 128 == 0 (hidden_size = {value})",
         "sglang marlin_utils.py check_moe_marlin_supports_layer", True, "fallback", formats=INT_FORMATS, path="moe-marlin",
         fallback_to="moe-wna16"),
    Rule("expert-wna16-32", "expert.K_r", "32",
         "AssertionError (moe_wna16.py: group halving reached group_size < 32; per-rank expert width {value} is not a multiple of 32)",
         "sglang moe_wna16.py MoeWNA16Method.create_weights", True, formats=INT_FORMATS, path="moe-wna16"),
)
