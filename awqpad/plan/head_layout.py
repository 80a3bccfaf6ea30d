"""Where zero heads go: the head map, feature inserts per qkv layout, the tensor ops of every attention
projection and the config.json updates for a chosen (heads', kv_heads') (see plan/heads.py for why)."""

from __future__ import annotations

from collections import defaultdict

from awqpad.checkpoint import formats
from awqpad.checkpoint.formats.base import LogicalInsert, TensorOp
from awqpad.checkpoint.model import Checkpoint, Linear
from awqpad.errors import UnsupportedError

GROUPED_QKV = ("internlm2",)  # [(q_1..q_r, k, v) per KV group]


def attention_linears(ckpt: Checkpoint) -> dict[int, dict[str, Linear]]:
    """layer -> {role: Linear} of the attention projections (q, k, v, o or qkv, o)."""
    layers: dict[int, dict[str, Linear]] = defaultdict(dict)
    for lin in ckpt.linears:
        if lin.block == "attn":
            layers[lin.layer][lin.role] = lin
    return dict(sorted(layers.items()))



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


def head_config_updates(ckpt: Checkpoint, h2: int, k2: int) -> dict[str, int]:
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
