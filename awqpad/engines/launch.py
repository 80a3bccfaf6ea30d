"""How each engine is launched for a parallel layout, as data: flag names from each engine's own CLI.

Sources (read in each project's argument parser):
  vllm      vllm/engine/arg_utils.py EngineArgs.add_cli_args: --tensor-parallel-size, --pipeline-parallel-size,
            --enable-expert-parallel (experts are spread over the TP x DP ranks, not split)
  sglang    python/sglang/srt/server_args.py ServerArgs.add_cli_args: --tp, --pp-size, --ep-size,
            --nnodes / --node-rank / --dist-init-addr for several nodes
  lmdeploy  lmdeploy/cli/serve.py api_server: --tp (TurboMind has no pipeline or expert parallelism)
  tgi       launcher/src/main.rs Args: --num-shard (tensor parallelism only)
  trtllm    tensorrt_llm/commands/serve.py (click options): --tp_size, --pp_size, --ep_size
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class LaunchFlags:
    command: str  # {model} is the checkpoint (directory or repo id)
    tp: str
    pp: str | None  # None: the engine has no pipeline parallelism
    ep: str | None  # None: no expert parallelism; "{ep}" in the flag takes the EP size
    nodes: str | None = None  # appended when the layout spans several nodes; {nodes} is the node count


LAUNCH = MappingProxyType({
    "vllm": LaunchFlags("vllm serve {model}", "--tensor-parallel-size {tp}", "--pipeline-parallel-size {pp}",
                        "--enable-expert-parallel", None),
    "sglang": LaunchFlags("python -m sglang.launch_server --model-path {model}", "--tp {tp}", "--pp-size {pp}",
                          "--ep-size {ep}", "--nnodes {nodes} --node-rank $NODE_RANK --dist-init-addr $HEAD_ADDR:5000"),
    "lmdeploy": LaunchFlags("lmdeploy serve api_server {model}", "--tp {tp}", None, None),
    "tgi": LaunchFlags("text-generation-launcher --model-id {model}", "--num-shard {tp}", None, None),
    "trtllm": LaunchFlags("trtllm-serve {model}", "--tp_size {tp}", "--pp_size {pp}", "--ep_size {ep}"),
})
ENGINE_OF_PROFILE = MappingProxyType({"vllm-latest": "vllm"})  # rule profiles that launch like another engine
MULTI_NODE_NOTE = MappingProxyType({
    "vllm": "several nodes: start a Ray cluster over them first (`ray start`), then run this on the head node",
    "sglang": "several nodes: run this on every node with its NODE_RANK and the head node's address",
    "trtllm": "several nodes: run under mpirun / srun with one process per GPU",
})


def launcher(profile: str) -> str:
    return ENGINE_OF_PROFILE.get(profile, profile)


def supports(profile: str, pp: int = 1, ep: bool = False) -> bool:
    flags = LAUNCH[launcher(profile)]
    return (pp == 1 or flags.pp is not None) and (not ep or flags.ep is not None)


def launch_command(profile: str, model: str, tp: int, pp: int = 1, ep: bool = False, nodes: int = 1) -> str | None:
    """The engine's serve command for this layout; None if the engine cannot run it."""
    if not supports(profile, pp, ep):
        return None
    flags = LAUNCH[launcher(profile)]
    parts = [flags.command.format(model=shlex.quote(model)), flags.tp.format(tp=tp)]
    if pp > 1:
        parts.append(flags.pp.format(pp=pp))
    if ep:
        parts.append(flags.ep.format(ep=tp))  # one EP group per pipeline stage
    if nodes > 1 and flags.nodes:
        parts.append(flags.nodes.format(nodes=nodes))
    return " ".join(parts)


def launch_lines(profiles, model: str, tp: int, ep: bool = False) -> tuple[str, ...]:
    """The launch line of every engine among `profiles` (a plan's engines), once per engine: the rule
    profiles vllm and vllm-latest share one line. Engines that cannot run the layout are left out."""
    lines: dict[str, str | None] = {}
    for profile in profiles:
        engine = launcher(profile)
        if engine in LAUNCH and engine not in lines:
            lines[engine] = launch_command(profile, model, tp, ep=ep)
    return tuple(line for line in lines.values() if line)
