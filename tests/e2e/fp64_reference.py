"""float64 reference for scripts/e2e_vllm_cpu_formats.sh (runs in the vLLM venv: torch + safetensors).

    python fp64_reference.py --model DIR --out RESULT.json

Dequantizes every linear of a tiny Qwen2 / Qwen3 dense checkpoint from its stored bytes with the
formulas below (written here from the format definitions, sharing no code with awqpad or vLLM), runs
the decoder in float64 on vllm_driver.PROMPTS, decodes greedily for vllm_driver.MAX_TOKENS steps and
writes the same JSON as `vllm_driver.py run` (tp "fp64"), so `vllm_driver.py compare/judge` read it.

Formats (by tensor names): plain `.weight`; FP8 `.weight` F8_E4M3 with a block scale
(`weight_scale_inv` of `quant_method: fp8`, or compressed-tensors `weight_scale` [ceil(N/bn), ceil(K/bk)])
or a per-channel `weight_scale` [N, 1]: W = e4m3fn(code) x scale of its block / row; NVFP4
(compressed-tensors `weight_packed` U8 [N, K/2], element 2i in the low nibble, e2m1 codes;
`weight_scale` F8_E4M3 [N, K/16]; `weight_global_scale` [1]): W = e2m1(code) x e4m3fn(block scale) /
global scale. Activations stay float64: NVFP4's W4A4 activation rounding in vLLM is NOT modelled, so
there the reference measures how far the engine is from the exact weights, for padded and unpadded alike.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from vllm_driver import MAX_TOKENS, PROMPTS, TOPK  # noqa: E402

F64 = torch.float64
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=F64)


def load(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _expand(scale: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    return scale.to(F64).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def dequant(t: dict, prefix: str, block: tuple[int, int]) -> torch.Tensor:
    """float64 W [N, K] of one linear module."""
    if prefix + ".weight_packed" in t:  # NVFP4 (compressed-tensors)
        packed = t[prefix + ".weight_packed"].to(torch.int64)
        n, half = packed.shape
        codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, 2 * half)
        scale = t[prefix + ".weight_scale"].to(F64) / t[prefix + ".weight_global_scale"].to(F64).reshape(())
        return E2M1[codes] * scale.repeat_interleave(16, 1)
    w = t[prefix + ".weight"]
    if w.dtype != torch.float8_e4m3fn:
        return w.to(F64)
    n, k = w.shape
    scale = t.get(prefix + ".weight_scale_inv", t.get(prefix + ".weight_scale"))
    if scale.numel() == 1:
        full = scale.to(F64).reshape(1, 1).expand(n, k)
    elif tuple(scale.shape) == (n, 1):
        full = scale.to(F64).expand(n, k)
    else:
        full = _expand(scale, n, k, block)
    return w.to(F64) * full


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.to(F64)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, d], neox style (rotate halves), positions 0..T-1."""
    T, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.arange(T, dtype=F64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Model:
    def __init__(self, path: Path):
        self.cfg = json.loads((path / "config.json").read_text())
        c = self.cfg
        if c["model_type"] not in ("qwen2", "qwen3"):
            raise SystemExit(f"fp64_reference: model_type {c['model_type']} not handled")
        q = c.get("quantization_config") or {}
        block = q.get("weight_block_size")
        for g in (q.get("config_groups") or {}).values():
            block = block or (g.get("weights") or {}).get("block_structure")
        self.block = tuple(block or (1, 1))
        self.t = load(path)
        self.heads, self.kv = c["num_attention_heads"], c["num_key_value_heads"]
        # vLLM's Qwen2 derives head_dim from hidden / heads; Qwen3 reads it
        self.hd = c.get("head_dim") if c["model_type"] == "qwen3" else c["hidden_size"] // self.heads
        self.eps, self.theta = c["rms_norm_eps"], c.get("rope_theta", 10000.0)
        self.w = {}
        for name in self.t:
            for suffix in (".weight_packed", ".weight"):
                if name.endswith(suffix) and ("_proj" in name or name.startswith("lm_head")):
                    p = name[: -len(suffix)]
                    self.w[p] = dequant(self.t, p, self.block)

    def lin(self, p: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w[p].T
        b = self.t.get(p + ".bias")
        return y if b is None else y + b.to(F64)

    def logits(self, ids: list[int]) -> torch.Tensor:
        t, T = self.t, len(ids)
        x = t["model.embed_tokens.weight"].to(F64)[torch.tensor(ids)]
        mask = torch.full((T, T), -math.inf, dtype=F64).triu(1)
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = rms(x, t[p + "input_layernorm.weight"], self.eps)
            q = self.lin(p + "self_attn.q_proj", h).reshape(T, self.heads, self.hd)
            k = self.lin(p + "self_attn.k_proj", h).reshape(T, self.kv, self.hd)
            v = self.lin(p + "self_attn.v_proj", h).reshape(T, self.kv, self.hd)
            if p + "self_attn.q_norm.weight" in t:
                q, k = rms(q, t[p + "self_attn.q_norm.weight"], self.eps), rms(k, t[p + "self_attn.k_norm.weight"], self.eps)
            q, k = rope(q, self.theta), rope(k, self.theta)
            rep = self.heads // self.kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.hd) + mask
            o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, self.heads * self.hd)
            x = x + self.lin(p + "self_attn.o_proj", o)
            h = rms(x, t[p + "post_attention_layernorm.weight"], self.eps)
            g, u = self.lin(p + "mlp.gate_proj", h), self.lin(p + "mlp.up_proj", h)
            x = x + self.lin(p + "mlp.down_proj", torch.nn.functional.silu(g) * u)
        x = rms(x, t["model.norm.weight"], self.eps)
        return self.lin("lm_head", x[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.time()
    m = Model(a.model)
    prompts = []
    for prompt in PROMPTS:
        ids, steps = list(prompt), []
        for _ in range(MAX_TOKENS):
            lp = torch.log_softmax(m.logits(ids), -1)
            top = torch.topk(lp, TOPK)
            tok = int(top.indices[0])
            steps.append({"token": tok, "logprob": float(lp[tok]),
                          "top": {str(int(i)): float(v) for v, i in zip(top.values, top.indices)}})
            ids.append(tok)
        prompts.append({"prompt": prompt, "tokens": [s["token"] for s in steps], "steps": steps})
    res = {"model": str(a.model), "tp": "fp64", "dtype": "float64", "load_s": 0.0,
           "generate_s": round(time.time() - t0, 1), "prompts": prompts}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"[fp64] {a.model}: tokens {[p['tokens'] for p in prompts]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
