"""The shape of an engine rule, and the quantization formats rules are keyed by.

A Rule constrains one quantity of the model at TP = t, for one engine, for the quantization formats in
`formats`, on one kernel path. Quantities:
  heads        num_attention_heads             (whole)
  kv_heads     num_key_value_heads             (special: divides t or t divides it, or plain % t)
  <kind>.K_r   per-rank input of the row-parallel down projection = W / t      kind: dense|shared|expert
  <kind>.N_r   per-rank output of the merged gate_up projection  = 2 W / t
  <kind>.W     the MLP width itself (whole)
  attn.K_r     per-rank input of o_proj = heads * head_dim / t
  attn.N_r     per-rank output of the merged qkv projection
  hidden       hidden_size (whole; MoE checkpoints only)
  group        the checkpoint's group size (whole)
A rule's `multiple` names what the quantity must be a multiple of: "t", "group", "pack", "lcm(group,N)",
"max(64,group)" or a number. Rules sharing an `any_of` tag are alternatives (one of them must hold).

Keys:
  formats   checkpoint formats (Linear.format) the rule is about; None = every format, quantized or not.
  quantized limits a rule to quantized (True) or unquantized (False) linears; None = both.
  path      the kernel path the rule guards ("marlin", "moe-marlin", "moe-wna16", ...; kernels.py names them).
  severity  what the engine does when the rule fails: "error" = it refuses to load ("refused");
            "fallback" = it loads through the slower kernel named in `fallback_to`.
  message   the engine's own text for that outcome; {value}, {t}, {m} are filled in.
  source    the engine file (and function) the row mirrors.
Adding a format's rules is adding rows with its format name in `formats`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linear.format values (checkpoint/formats/*.NAME).
AWQ = "awq-gemm"
GPTQ = "gptq"
CT_INT = "compressed-tensors"
DENSE = "dense"
INT_FORMATS = (AWQ, GPTQ, CT_INT)

OUTCOMES = {"error": "refused", "fallback": "fallback"}


@dataclass(frozen=True)
class Rule:
    id: str
    quantity: str
    multiple: str
    message: str
    source: str
    quantized: bool | None = None
    severity: str = "error"
    any_of: str | None = None
    formats: tuple[str, ...] | None = None
    path: str | None = None
    fallback_to: str | None = None

    @property
    def outcome(self) -> str:
        """What a failing rule means for the user: refused | fallback."""
        return OUTCOMES[self.severity]

    def covers(self, fmt: str | None) -> bool:
        return self.formats is None or fmt in self.formats


def for_formats(formats: tuple[str, ...], *rules: Rule) -> tuple[Rule, ...]:
    """The same rows, keyed to `formats` (shared text, one place)."""
    import dataclasses

    return tuple(dataclasses.replace(r, formats=formats) for r in rules)


# Texts several engines print verbatim.
HEADS = "Total number of attention heads ({value}) must be divisible by tensor parallel size ({t})."
DIVISIBLE = "AssertionError: {value} is not divisible by {t}"
KV_REPL = "AssertionError: {value} is not divisible by {t} (KV heads must divide TP or TP must divide them)"
AWQ_IN = "The input size is not aligned with the quantized weight shape. This can be caused by too large tensor parallel size."
AWQ_OUT = "The output size is not aligned with the quantized weight shape. This can be caused by too large tensor parallel size."
MARLIN_K = "Weight input_size_per_partition = {value} is not divisible by min_thread_k = 128. Consider reducing tensor_parallel_size or running with --quantization gptq."
MARLIN_N = "Weight output_size_per_partition = {value} is not divisible by  min_thread_n = 64. Consider reducing tensor_parallel_size or running with --quantization gptq."
MARLIN_G = "Weight input_size_per_partition = {value} is not divisible by group_size = {m}. Consider reducing tensor_parallel_size or running with --quantization gptq."
