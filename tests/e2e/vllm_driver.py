"""Driver for scripts/e2e_vllm_cpu.sh (runs inside the vLLM venv, not under pytest).

    python vllm_driver.py run --model DIR --tp N --out RESULT.json
    python vllm_driver.py compare REF.json OTHER.json [--tol 0.01]
    python vllm_driver.py judge --ref R.json --padded P.json --control-tp1 C1.json --control C.json \
        --fp64 F.json --control-fp64 CF.json [--tol 0.01] [--drift-factor 2]

`run` starts vLLM's offline engine (CPU, gloo, dtype float16, enforce_eager, greedy) on fixed
token-id prompts (the test checkpoints have no real tokenizer) and writes the generated token ids and
per-step log-probs. `compare` exits 0 iff the greedy tokens are identical (a later step may differ
only where both runs rank the two picks within --tol: a float16 tie) and the first-step log-probs
(chosen token and the shared top-k) differ by at most --tol. `judge` (scripts/e2e_vllm_cpu_formats.sh)
measures vLLM's own TP drift on a control model that needs no padding and allows the padded run that
much (see `judge`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Fixed prompts as token ids (vocab of the test checkpoints is 320; ids 0..2 are specials).
PROMPTS = [
    [17, 42, 199, 7, 250, 311, 64, 128, 90, 33, 5, 271],
    [301, 3, 88, 160, 222, 45, 19, 77],
    [9, 140, 141, 142, 260, 12, 305, 56, 200, 11, 99, 100, 101, 4, 318, 27],
]
MAX_TOKENS = 8
TOPK = 5


def _env_for(tp: int) -> None:
    ncpu = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        if tp <= ncpu:
            per = ncpu // tp
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                f"{r * per}-{r * per + per - 1}" if per > 1 else str(r) for r in range(tp))
        else:  # more ranks than cores (TP 4 on 2 cores): let the OS schedule them
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"


def cmd_run(args: argparse.Namespace) -> int:
    _env_for(args.tp)
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tp,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        distributed_executor_backend="mp" if args.tp > 1 else None,
        skip_tokenizer_init=True,
        seed=0,
    )
    t_load = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOPK,
                            detokenize=False, ignore_eos=True)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    t_gen = time.time() - t1
    result = {"model": args.model, "tp": args.tp, "dtype": args.dtype,
              "load_s": round(t_load, 1), "generate_s": round(t_gen, 1), "prompts": []}
    for prompt, out in zip(PROMPTS, outs):
        comp = out.outputs[0]
        steps = []
        for tok, lp in zip(comp.token_ids, comp.logprobs or []):
            steps.append({"token": int(tok),
                          "logprob": float(lp[tok].logprob),
                          "top": {str(int(t)): float(v.logprob) for t, v in lp.items()}})
        result["prompts"].append({"prompt": prompt, "tokens": [int(t) for t in comp.token_ids],
                                  "steps": steps})
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"[driver] tp={args.tp} load {t_load:.1f}s generate {t_gen:.1f}s tokens "
          f"{[p['tokens'] for p in result['prompts']]}", file=sys.stderr)
    # Shut the engine (and its worker processes) down before exiting.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    return 0


def _tie(a: dict, b: dict, tol: float) -> float | None:
    """Where greedy picks differ at one step: the larger of the two runs' margins between the two
    picks if both runs list both tokens in their top-k and rank them within `tol` of each other (a
    tie that float16 rounding may break either way), else None (a real disagreement)."""
    ta, tb = str(a["token"]), str(b["token"])
    if not {ta, tb} <= set(a["top"]) or not {ta, tb} <= set(b["top"]):
        return None
    margin = max(a["top"][ta] - a["top"][tb], b["top"][tb] - b["top"][ta])
    return margin if margin <= tol else None


def compare(ref: dict, other: dict, tol: float) -> tuple[bool, str]:
    """Greedy tokens identical for every prompt, and first-step log-probs (the chosen token and every
    token in both top-k lists) within `tol`. A later step where the picks differ passes only as a
    tie (both runs rank the two tokens within `tol` of each other); the continuations after it are
    conditioned on different tokens, so they are not compared."""
    ok = True
    notes = []
    ties = []
    max_first = 0.0
    max_all = 0.0
    if len(ref["prompts"]) != len(other["prompts"]):
        ok = False
        notes.append("different number of prompts")
    for i, (a, b) in enumerate(zip(ref["prompts"], other["prompts"])):
        if a["prompt"] != b["prompt"]:
            ok = False
            notes.append(f"prompt {i}: different prompt token ids")
        sa, sb = a["steps"][0], b["steps"][0]
        d = max(abs(sa["top"][t] - sb["top"][t]) for t in set(sa["top"]) & set(sb["top"])) \
            if set(sa["top"]) & set(sb["top"]) else float("inf")
        if sa["token"] == sb["token"]:
            d = max(d, abs(sa["logprob"] - sb["logprob"]))
        max_first = max(max_first, d)
        if len(a["steps"]) != len(b["steps"]):
            ok = False
            notes.append(f"prompt {i}: {len(a['steps'])} vs {len(b['steps'])} steps")
        for step, (xa, xb) in enumerate(zip(a["steps"], b["steps"])):
            if xa["token"] == xb["token"]:
                max_all = max(max_all, abs(xa["logprob"] - xb["logprob"]))
                continue
            margin = _tie(xa, xb, tol) if step > 0 else None
            if margin is None:
                ok = False
                notes.append(f"prompt {i}: tokens differ at step {step}: {a['tokens']} vs {b['tokens']}")
            else:
                ties.append(f"prompt {i} step {step}: {xa['token']} vs {xb['token']} tied within {margin:.4f}")
            break
    if max_first > tol:
        ok = False
        notes.append(f"first-step log-prob diff {max_first:.4f} > {tol:.4g}")
    same = not any("tokens differ" in n for n in notes)
    summary = (f"tokens {'identical' if same and not ties else 'identical up to ties' if same else 'DIFFER'}, "
               f"first-step |dlogprob| max {max_first:.4f} (tol {tol:.4g}), matching steps {max_all:.4f}; "
               f"tp={other['tp']} load {other['load_s']}s gen {other['generate_s']}s")
    if ties:
        summary += "; ties at the run's dtype (not compared further): " + "; ".join(ties)
    if notes:
        summary += "; " + "; ".join(notes)
    return ok, summary


def first_step_gap(a: dict, b: dict) -> float:
    """Largest first-step |log-prob difference| over all prompts (chosen token when both pick it, and
    every token in both top-k lists); inf where there is nothing to compare."""
    if not a["prompts"] or len(a["prompts"]) != len(b["prompts"]):
        return float("inf")
    gap = 0.0
    for pa, pb in zip(a["prompts"], b["prompts"]):
        if not pa["steps"] or not pb["steps"]:
            return float("inf")
        sa, sb = pa["steps"][0], pb["steps"][0]
        shared = set(sa["top"]) & set(sb["top"])
        if not shared:
            return float("inf")
        gap = max(gap, max(abs(sa["top"][t] - sb["top"][t]) for t in shared))
        if sa["token"] == sb["token"]:
            gap = max(gap, abs(sa["logprob"] - sb["logprob"]))
    return gap


def judge(ref: dict, padded: dict, control_tp1: dict, control: dict, fp64: dict, control_fp64: dict,
          tol: float, drift_factor: float = 2.0) -> tuple[bool, str]:
    """A padded checkpoint at TP n (`padded`) against the unpadded one at TP 1 (`ref`), allowing vLLM's
    own TP drift, measured on a control model of the same format that needs no padding (`control_tp1`
    vs `control` at TP n >= the padded run's; `fp64` / `control_fp64`: float64 references of the
    unpadded model and of the control). With gap = first_step_gap:

        drift = gap(control_tp1, control)                     allow = tol + drift_factor * drift
        1. compare(ref, padded, allow) passes: greedy tokens identical (a later flip only as a tie
           within `allow`) and first-step gap within `allow`;
        2. gap(fp64, padded) - gap(fp64, ref) <= tol + drift_factor * |gap(control_fp64, control) -
           gap(control_fp64, control_tp1)|: padding moves vLLM no further from the exact function than
           going to TP n moves the control from its own.

    Anything not compared (no prompts, no steps, no shared top-k) is a failure."""
    drift = first_step_gap(control_tp1, control)
    err_ref, err_pad = first_step_gap(fp64, ref), first_step_gap(fp64, padded)
    c1, cn = first_step_gap(control_fp64, control_tp1), first_step_gap(control_fp64, control)
    if not all(math.isfinite(x) for x in (drift, err_ref, err_pad, c1, cn)):
        return False, (f"nothing to compare (control drift {drift}, fp64 gaps {err_ref} / {err_pad} / "
                       f"{c1} / {cn}): empty or mismatched results")
    allow = tol + drift_factor * drift
    allow64 = tol + drift_factor * abs(cn - c1)
    ok, line = compare(ref, padded, allow)
    near = err_pad - err_ref <= allow64
    summary = (f"control drift tp1->tp{control['tp']} {drift:.4f} -> allowance {allow:.4f}; vs unpadded tp1: "
               f"{line}; vs fp64: padded {err_pad:.4f}, unpadded {err_ref:.4f} (control {c1:.4f} -> {cn:.4f}, "
               f"allowance {allow64:.4f})"
               f"{'' if near else f'; padded is {err_pad - err_ref:.4f} further from fp64, > {allow64:.4f}'}")
    return ok and near, summary


def cmd_judge(args: argparse.Namespace) -> int:
    docs = {}
    for key in ("ref", "padded", "control_tp1", "control", "fp64", "control_fp64"):
        with open(getattr(args, key)) as fh:
            docs[key] = json.load(fh)
    ok, summary = judge(**docs, tol=args.tol, drift_factor=args.drift_factor)
    print(summary)
    return 0 if ok else 1


def cmd_compare(args: argparse.Namespace) -> int:
    with open(args.ref) as fh:
        ref = json.load(fh)
    with open(args.other) as fh:
        other = json.load(fh)
    ok, summary = compare(ref, other, args.tol)
    print(summary)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--dtype", default="float16")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("other")
    c.add_argument("--tol", type=float, default=0.01)
    j = sub.add_parser("judge")
    for key in ("ref", "padded", "control-tp1", "control", "fp64", "control-fp64"):
        j.add_argument(f"--{key}", required=True)
    j.add_argument("--tol", type=float, default=0.01)
    j.add_argument("--drift-factor", type=float, default=2.0)
    args = p.parse_args(argv)
    return {"run": cmd_run, "compare": cmd_compare, "judge": cmd_judge}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
