"""What FP8 padding costs per GPU, next to the layouts that need no padding at all (with launch lines).

Block-FP8 expert padding is expensive (+33 % for 768 -> 1024, +100 % for 512 -> 1024 or DeepSeek's 2048 ->
4096 at TP 32) and maintainers prefer expert parallelism (ROCm/MAD#202 on vllm#48173: "enable EP later
instead of hacking a padding fix into vLLM"), so `plan` never lets the padding speak alone: it prints the
added bytes per GPU and every alternative that loads the checkpoint unpadded on the same GPU count --
expert parallelism (vLLM --enable-expert-parallel, SGLang --ep-size), TP x PP, and the largest smaller TP.
"""

from __future__ import annotations

from awqpad.engines.evaluate import evaluate
from awqpad.engines.launch import launch_command, supports


def _clean(ckpt, engine: str, t: int, ep: bool = False) -> bool:
    """No error at all (paddable or not) for this engine at TP t: the checkpoint loads as it is."""
    return not any(v.severity == "error" for v in evaluate(ckpt, engine, t, expert_parallel=ep))


def cost_lines(ckpt, dims, tps, engine: str, model: str) -> list[str]:
    """Warning lines: added bytes per GPU, then each no-padding alternative with its launch line."""
    changed = [d for d in dims if d.padded != d.original]
    if not changed:
        return []
    t = max(tps)
    added = sum(d.added_bytes for d in changed)
    parts = ", ".join(f"{d.kind} {d.original} -> {d.padded} (+{d.added_fraction:.0%})" for d in changed)
    lines = [f"FP8 padding cost at TP {t}: +{added / t / 1e9:.2f} GB of weights per GPU (+{added / 1e9:.2f} GB in all; "
             f"{parts}); layouts that need no padding on {t} GPUs:"]
    options = []
    if supports(engine, ep=True) and any(b.kind == "expert" for b in ckpt.mlps) and _clean(ckpt, engine, t, ep=True):
        options.append(("expert parallelism (experts whole per GPU, no padding)", launch_command(engine, model, t, ep=True)))
    for pp in (2, 4, 8):
        if t % pp == 0 and t // pp >= 1 and supports(engine, pp=pp) and _clean(ckpt, engine, t // pp):
            options.append((f"TP {t // pp} x PP {pp}", launch_command(engine, model, t // pp, pp=pp)))
            break
    smaller = next((c for c in (16, 8, 4, 2, 1) if c < t and _clean(ckpt, engine, c)), None)
    if smaller is not None:
        options.append((f"a smaller TP {smaller} ({smaller} GPUs)", launch_command(engine, model, smaller)))
    if not options:
        lines[0] = lines[0].replace("; layouts that need no padding on", "; no unpadded layout loads on") + " padding is needed"
    lines += [f"  {what}: {cmd}" for what, cmd in options if cmd]
    return lines
