"""Tier 1, part 2: a runtime we did not write loads awqpad's output and computes the same logits.

transformers 5.x (`AutoModelForCausalLM`, CPU) loads the original and the padded checkpoint; AWQ and
GPTQ go through GPTQModel's kernels (transformers' only AWQ/GPTQ backend; GPTQ also needs optimum).
On a fixed batch of token ids (the fixtures' tokenizers are stubs) the logits must be identical:
max |diff| == 0.

Why exactly 0 and not "<= 1e-6": the padded channels contribute exact zeros (their weights decode to
+-0, see test_oracles.py), and the kernels used here dequantize to a dense weight and call one matmul
whose reduction over the padded K splits the same way for K=2432 and K=2560 (both multiples of the
CPU GEMM's K blocking). In float32 a different blocking could reorder sums (formats-and-padding.md
§9 saw <= 6e-7); if a future torch/BLAS ever does that, this test will say so with the observed value.

Kernels are pinned so the test does not depend on the CPU (and does not JIT-compile GPTQModel's
AVX512-BF16 extension, ~2 min): AWQ -> GPTQModel `torch_awq` (dequantize_gemm + matmul); GPTQ ->
GPTQModel `gptq_torch_aten` (torch's own `_weight_int4pack_mm_for_cpu` int4 kernel). The GPTQModel
loader is also run with its ATen int4 kernel for AWQ.

Fixtures: tests/factory.py checkpoints (AWQ, GPTQ v1 sym, GPTQ v2 asym, fp16) and two checkpoints
made by GPTQModel's real GPTQ and AWQ quantizers (scripts/real_quant_fixture.py, cached under
.cache/awqpad-tests/ keyed by package versions). The real-quantizer checkpoints also go through the
third-party decoders of test_oracles.py.

Missing packages skip locally and fail when CI is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from tests import oracle_env
    from tests.factory import Model, Quant, build_checkpoint
except ImportError:  # pragma: no cover
    import oracle_env
    from factory import Model, Quant, build_checkpoint

torch = oracle_env.import_torch(module_level=True)

try:
    from tests import test_oracles as oracles
except ImportError:  # pragma: no cover
    import test_oracles as oracles

pytestmark = pytest.mark.oracle

REPO = Path(__file__).resolve().parent.parent
MODEL = oracles.MODEL
# fp16 needs no padding at 2432 for TP 2/4 (width % t is all vLLM asks of unquantized layers);
# 2434 is not divisible by 4 and pads to 2436.
MODEL_FP16 = Model(**{**MODEL.__dict__, "intermediate": 2434})
IDS = torch.tensor([
    [17, 42, 199, 7, 250, 311, 64, 128, 90, 33, 5, 271, 3, 150, 160, 170],
    [301, 3, 88, 160, 222, 45, 19, 77, 9, 140, 141, 142, 260, 12, 305, 56],
])
BACKEND = {"awq": "torch_awq", "gptq": "gptq_torch_aten"}


def _require_runtime():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    for mod in ("transformers", "accelerate", "optimum", "gptqmodel"):
        try:
            __import__(mod)
        except Exception as e:
            oracles.missing(mod, f"{type(e).__name__}: {e}")


def hf_logits(path: Path, dtype=torch.float16) -> tuple[torch.Tensor, str]:
    """AutoModelForCausalLM on CPU, float16 -> (logits float32, class of the down_proj module)."""
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    cfg = json.loads((path / "config.json").read_text())
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    kw = {}
    if method == "awq":
        kw["quantization_config"] = AwqConfig(bits=cfg["quantization_config"]["bits"], backend=BACKEND["awq"])
    elif method == "gptq":
        kw["quantization_config"] = GPTQConfig(bits=cfg["quantization_config"]["bits"], backend=BACKEND["gptq"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu", **kw)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits.float()
    kind = type(model.model.layers[0].mlp.down_proj).__name__
    del model
    return out, kind


def gptqmodel_logits(path: Path, backend: str) -> tuple[torch.Tensor, str]:
    from gptqmodel import BACKEND as B
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(path), device="cpu", backend=getattr(B, backend), dtype=torch.float16)
    with torch.no_grad():
        out = model.model(input_ids=IDS).logits.float()
    kind = type(model.model.model.layers[0].mlp.down_proj).__name__
    del model
    return out, kind


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite logits"
    assert a.abs().max() > 0.1 and a.std() > 0.01, f"{what}: degenerate logits, the check would prove nothing"
    diff = (a - b).abs().max().item()
    assert diff == 0.0, f"{what}: padded logits differ from unpadded, max |diff| = {diff:.3e}"


def pad(src: Path, out: Path) -> Path:
    oracles.run_awqpad_pad(src, out)
    return out


@pytest.fixture(scope="module")
def factory_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    made = {}

    def get(name: str):
        if name not in made:
            quant, model = {
                "awq": (Quant("awq", sym=False), MODEL),
                "gptq-v1-sym": (Quant("gptq", sym=True), MODEL),
                "gptq-v2-asym": (Quant("gptq", sym=False, checkpoint_format="gptq_v2"), MODEL),
                "fp16": (Quant("fp16"), MODEL_FP16),
            }[name]
            fx = build_checkpoint(root / name, model, quant, shards=2, seed=21)
            made[name] = (fx, root / name, pad(root / name, root / f"{name}-padded"))
        return made[name]

    return get


@pytest.mark.parametrize("name", ["awq", "gptq-v1-sym", "gptq-v2-asym", "fp16"])
def test_transformers_logits_identical_after_padding(name, factory_pairs):
    _require_runtime()
    fx, src, out = factory_pairs(name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] > fx.model.intermediate, "awqpad did not pad; the test would prove nothing"
    a, kind_a = hf_logits(src)
    b, kind_b = hf_logits(out)
    assert kind_a == kind_b
    assert_same_logits(a, b, f"{name} via transformers ({kind_a})")


def test_transformers_awq_matches_dequantized_fp16(factory_pairs, tmp_path):
    """Sanity of the harness: the AWQ runtime really computes with the stored int4 weights (logits close
    to an fp16 model holding exactly the factory's dequantized weights), so 'identical logits' above is
    not identical garbage."""
    _require_runtime()
    fx, src, _ = factory_pairs("awq")
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    dense = {}
    for k, v in tensors.items():
        prefix, leaf = k.rsplit(".", 1)
        if prefix in fx.module_quant and fx.module_quant[prefix] is not None:
            if leaf in ("qweight", "qzeros", "scales"):
                continue
        dense[k] = v
    for prefix in fx.quantized:
        dense[f"{prefix}.weight"] = torch.from_numpy(fx.weights[prefix]).to(torch.float16)
    deq = tmp_path / "deq16"
    deq.mkdir()
    save_file(dense, str(deq / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (deq / "config.json").write_text(json.dumps(cfg))
    a, _ = hf_logits(src)
    b, _ = hf_logits(deq)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.9999 and (a - b).abs().max().item() < 0.05, f"AWQ runtime vs dequantized fp16: cos {cos}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# ------------------------------------------------------------------------------------------------
# checkpoints from a real quantizer (GPTQModel), cached
# ------------------------------------------------------------------------------------------------

def real_fixture(method: str) -> Path:
    _require_runtime()
    cache_root = Path(os.environ.get("AWQPAD_TEST_CACHE", REPO / ".cache" / "awqpad-tests"))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "real_quant_fixture.py"), method,
                        "--cache-root", str(cache_root)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"GPTQModel {method} quantizer failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    path = Path(r.stdout.strip().splitlines()[-1])
    assert (path / "config.json").exists(), path
    return path


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    made = {}

    def get(method: str):
        if method not in made:
            src = real_fixture(method)
            made[method] = (src, pad(src, root / f"{method}-padded"))
        return made[method]

    return get


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_real_quantizer_checkpoint_logits_identical_after_padding(method, real_pairs):
    src, out = real_pairs(method)
    cfg_o = json.loads((src / "config.json").read_text())
    cfg_p = json.loads((out / "config.json").read_text())
    assert cfg_o["quantization_config"]["quant_method"] == method
    assert (cfg_o["intermediate_size"], cfg_p["intermediate_size"]) == (2432, 2560)
    a, kind = hf_logits(src)
    b, _ = hf_logits(out)
    assert_same_logits(a, b, f"GPTQModel-quantized {method} via transformers ({kind})")


@pytest.mark.parametrize("method,backend", [("awq", "AWQ_TORCH_ATEN"), ("gptq", "GPTQ_TORCH_ATEN")])
def test_real_quantizer_checkpoint_gptqmodel_loader(method, backend, real_pairs):
    """GPTQModel's own loader with torch's ATen int4pack kernel (a second kernel family)."""
    src, out = real_pairs(method)
    a, kind = gptqmodel_logits(src, backend)
    b, _ = gptqmodel_logits(out, backend)
    assert_same_logits(a, b, f"GPTQModel-quantized {method} via GPTQModel.load ({kind})")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_real_quantizer_checkpoint_third_party_decoders(method, real_pairs):
    """The owners' decoders on a checkpoint a real quantizer wrote: padding decodes to exact 0, the rest
    is bit-identical."""
    oracles.require_oracles(method)
    src, out = real_pairs(method)
    cfg_o = json.loads((src / "config.json").read_text())
    cfg_p = json.loads((out / "config.json").read_text())
    t_o, t_p = oracles.load_torch(src), oracles.load_torch(out)
    report = json.loads((out / "awqpad.json").read_text())
    ops = {op["tensor"]: op for op in report["ops"]}
    bits = cfg_o["quantization_config"]["bits"]
    prefixes = sorted({k.rsplit(".", 1)[0] for k in t_o if k.endswith(".qweight")})
    assert len(prefixes) == 7 * MODEL.layers, prefixes
    padded = 0
    decoders = oracles.decoders_for(cfg_o)
    for prefix in prefixes:
        for oname, decode in decoders:
            w_o = decode(oracles.module_tensors(t_o, prefix), cfg_o)
            w_p = decode(oracles.module_tensors(t_p, prefix), cfg_p)
            n_pos = oracles.inserted_positions(ops, prefix, method, bits, "N", w_p.shape[0])
            k_pos = oracles.inserted_positions(ops, prefix, method, bits, "K", w_p.shape[1])
            where = f"{method} {prefix} [{oname}]"
            assert w_p.shape[0] - w_o.shape[0] == len(n_pos) and w_p.shape[1] - w_o.shape[1] == len(k_pos), where
            if n_pos:
                assert torch.count_nonzero(w_p[n_pos, :]) == 0, f"{where}: padded outputs not exactly 0"
            if k_pos:
                assert torch.count_nonzero(w_p[:, k_pos]) == 0, f"{where}: padded inputs not exactly 0"
            kept = w_p[oracles.keep_mask(w_p.shape[0], n_pos)][:, oracles.keep_mask(w_p.shape[1], k_pos)]
            assert oracles.bit_equal(kept, w_o), f"{where}: original region changed"
            padded += bool(n_pos or k_pos)
    assert padded == 3 * MODEL.layers * len(decoders)


HEAD_SHAPES = {
    # Qwen2.5-7B's head layout (28 query / 4 KV heads), refused at TP 8, scaled down to head_dim 16
    "qwen2.5-7b-heads-tp8": (Model("qwen2", hidden=448, intermediate=1024, heads=28, kv_heads=4, head_dim=16, layers=2,
                                   vocab=320), 8, 32),
    # Qwen2.5-0.5B's real attention dims (896 = 14 x 64, 2 KV heads, no head_dim in config), refused at TP 4
    "qwen2.5-0.5b-heads-tp4": (Model("qwen2", hidden=896, intermediate=512, heads=14, kv_heads=2, head_dim=64, layers=2,
                                     vocab=320), 4, 16),
}


@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_transformers_logits_identical_after_head_padding(tmp_path, shape):
    """Issue 8: zero heads at the end of each KV group, zero o_proj columns, explicit head_dim.
    transformers >= 4.48 reads head_dim for Qwen2, so the padded model must give the unpadded logits."""
    _require_runtime()
    model, tp, new_heads = HEAD_SHAPES[shape]
    build_checkpoint(tmp_path / "src", model, Quant("fp16"), shards=2, seed=5)
    proc = subprocess.run([sys.executable, "-m", "awqpad", "pad", str(tmp_path / "src"), str(tmp_path / "out"), "--tp", str(tp),
                           "--engine", "sglang", "--pad-heads", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == \
        (new_heads, model.kv_heads, model.head_dim)
    # float64: head padding changes o_proj's K and the attention kernel's head batching, so float16 sums
    # round differently (~1e-3) although every added term is an exact zero; in float64 the reordering is
    # far below the logits' resolution and the result must agree to ~1e-12.
    a, _ = hf_logits(tmp_path / "src", torch.float64)
    b, _ = hf_logits(tmp_path / "out", torch.float64)
    assert torch.isfinite(a).all() and a.abs().max() > 0.1
    diff = (a - b).abs().max().item()
    assert diff <= 1e-12 * a.abs().max().item(), f"head-padded logits differ by {diff:.3e}"
    # and the wrong layout (zero heads appended after the last KV group) is caught by the same comparison
    from safetensors.torch import load_file, save_file

    d, per, groups = model.head_dim, new_heads // model.kv_heads, model.kv_heads
    assert new_heads - model.heads == groups  # one zero head at the end of each group, as awqpad lays it out
    order = [g * per + i for g in range(groups) for i in range(per - 1)] + [g * per + per - 1 for g in range(groups)]
    rows = torch.cat([torch.arange(x * d, (x + 1) * d) for x in order])
    for shard in (tmp_path / "out").glob("*.safetensors"):
        t = load_file(str(shard))
        for name in list(t):
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t[name] = t[name][rows].contiguous()
            elif name.endswith("o_proj.weight"):
                t[name] = t[name][:, rows].contiguous()
        save_file(t, str(shard), metadata={"format": "pt"})
    c, _ = hf_logits(tmp_path / "out", torch.float64)
    assert (a - c).abs().max().item() > 1e-3, "appending zero heads at the end should break GQA"
