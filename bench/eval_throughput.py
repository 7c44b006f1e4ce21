"""Throughput of sharded evaluation (1 and 2 CPU processes) against a naive one-prompt-at-a-time loop.

    python bench/eval_throughput.py [--samples 64] [--max-new-tokens 32] [--batch-size 16]
    python bench/eval_throughput.py --smoke     # all three modes at tiny sizes; targets not checked

Builds a small seeded Llama, then measures in one run: the naive loop (model.generate per prompt),
evaluate() on one process and evaluate() on two processes (accelerate launch, DDP on CPU).
Prints samples/s, the ratios, and the share of evaluation time spent computing metrics; writes
bench/results/eval_throughput-*.json; exits 1 if batched sharded evaluation is not at least 3x the naive
loop or metrics take 5% or more, or if a mode returned nonsense (not one prediction per sample, no generated
text at all, non-finite timings). --smoke: hidden 32, 1 layer, 4 samples, 2 new tokens, batch 2; only the
sanity checks decide its exit status.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (Sanity, exit_status, machine_load, parse_args, run_process, versions,  # noqa: E402
                          write_results)

SMOKE = {"samples": 4, "max_new_tokens": 2, "batch_size": 2, "hidden": 32, "layers": 1, "timeout": 300}


def _tiny():
    spec = importlib.util.spec_from_file_location(
        "eval_tiny_llama", REPO / "tests" / "distributed" / "scripts" / "eval_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_records(n: int, seed: int = 0) -> list[dict]:
    words = _tiny().WORDS
    rng = random.Random(seed)
    return [{"task": "bench", "prompt": " ".join(rng.choices(words, k=rng.randint(4, 24))),
             "reference": " ".join(rng.choices(words, k=rng.randint(3, 12)))} for _ in range(n)]


def load(model_dir: str):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    return LlamaForCausalLM.from_pretrained(model_dir), PreTrainedTokenizerFast.from_pretrained(model_dir)


def run_evaluate(model_dir: str, args, accelerator) -> dict:
    """evaluate() over the records; wall time from a common start on every process."""
    from distributed_ft.eval import EvalConfig, evaluate

    model, tokenizer = load(model_dir)
    model = accelerator.prepare(model)
    cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    records = make_records(args.samples)
    evaluate(model, tokenizer, records[:4], accelerator, cfg, {"bench": "generation"})  # warm-up
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    result = evaluate(model, tokenizer, records, accelerator, cfg, {"bench": "generation"})
    wall = time.perf_counter() - start
    return {"wall_s": wall, **result.timing, "processes": accelerator.num_processes,
            "predictions": [r["prediction"] for r in result.predictions]}


def naive(model_dir: str, args) -> dict:
    import torch

    torch.set_num_threads(1)  # one core per process in every mode, so the modes compare fairly
    model, tokenizer = load(model_dir)
    model.eval()
    records = make_records(args.samples)
    outputs = []

    def one(prompt):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    one(records[0]["prompt"])  # warm-up
    start = time.perf_counter()
    for rec in records:
        outputs.append(one(rec["prompt"]))
    return {"wall_s": time.perf_counter() - start, "predictions": outputs}


def worker(args) -> None:
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched else [])
    out = run_evaluate(args.model_dir, args, accelerator)
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(out))
    accelerator.end_training()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per evaluate() run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        from distributed_ft.engine.process_exit import exit_process

        worker(args)
        exit_process(0)  # a launched rank skips native teardown at interpreter exit, which can abort it

    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="dft-eval-bench-") as tmp:
        results = run_modes(Path(tmp), args)
    if results is None:
        return 1
    return report(results, args, load_before)


def run_modes(tmp: Path, args) -> dict | None:
    """The naive loop here, then evaluate() in a fresh process and under a 2-process launch."""
    model_dir = str(_tiny().build_tiny_llama(tmp / "model", hidden=args.hidden, layers=args.layers))
    common = ["--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
              "--batch-size", str(args.batch_size), "--model-dir", model_dir, "--worker"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    results = {"naive": naive(model_dir, args)}
    for procs in (1, 2):
        out = tmp / f"sharded{procs}.json"
        if procs == 1:
            cmd = [sys.executable, __file__, *common, "--out", str(out)]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, *common,
                   "--out", str(out)]
        proc = run_process(cmd, {**env, "ACCELERATE_USE_CPU": "1"} if procs > 1 else env, args.timeout)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"FAILED: evaluate() on {procs} process(es) exited {proc.returncode}", file=sys.stderr)
            return None
        results[f"sharded_{procs}p"] = json.loads(out.read_text())
    return results


def check_mode(sanity: Sanity, mode: str, r: dict, samples: int) -> None:
    """One prediction per sample, some text actually generated, finite timings."""
    preds = r["predictions"]
    sanity.check(len(preds) == samples, f"{mode}: {len(preds)} predictions for {samples} samples")
    sanity.check(any(isinstance(p, str) and p.strip() for p in preds), f"{mode}: no text generated: {preds[:4]}")
    sanity.finite(f"{mode}: wall_s", r["wall_s"], positive=True)
    for key in ("generation_s", "loss_s", "metric_s"):
        if key in r or mode != "naive":
            sanity.finite(f"{mode}: {key}", r.get(key))


def report(results: dict, args, load_before: dict) -> int:
    sanity = Sanity()
    for mode, r in results.items():
        check_mode(sanity, mode, r, args.samples)
    if not sanity.ok:
        return exit_status(sanity, False, args.smoke)
    n = args.samples
    naive_rate = n / results["naive"]["wall_s"]
    if args.smoke:
        print("SMOKE RUN (tiny sizes, targets not checked)")
    print(f"samples={n} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
          f"hidden={args.hidden} layers={args.layers} threads/process=1 cpu_cores={os.cpu_count()}")
    print(f"{'mode':<22}{'samples/s':>11}{'x naive':>9}{'gen s':>9}{'metric s':>10}{'metric %':>10}")
    print(f"{'naive (1 at a time)':<22}{naive_rate:>11.2f}{1.0:>9.2f}{results['naive']['wall_s']:>9.2f}")
    ok = True
    summary = {"naive": {"samples_per_s": naive_rate}}
    for procs in (1, 2):
        r = results[f"sharded_{procs}p"]
        rate = n / r["wall_s"]
        share = 100 * r["metric_s"] / max(r["generation_s"] + r["loss_s"] + r["metric_s"], 1e-12)
        same = r["predictions"] == results["naive"]["predictions"]
        summary[f"sharded_{procs}p"] = {"samples_per_s": rate, "x_naive": rate / naive_rate, "metric_share_pct": share,
                                        "same_predictions_as_naive": same}
        print(f"{f'sharded {procs} process':<22}{rate:>11.2f}{rate / naive_rate:>9.2f}{r['generation_s']:>9.2f}"
              f"{r['metric_s']:>10.3f}{share:>9.2f}%  same predictions as naive: {same}")
        ok &= share < 5.0
    best = max(n / results[f"sharded_{p}p"]["wall_s"] for p in (1, 2))
    ratio_2_1 = results["sharded_1p"]["wall_s"] / results["sharded_2p"]["wall_s"]
    print(f"2 processes vs 1: {ratio_2_1:.2f}x; best sharded vs naive: {best / naive_rate:.2f}x (needs >= 3x); "
          f"metrics < 5% of eval time: {ok}{' (not checked in a smoke run)' if args.smoke else ''}")
    ok &= best / naive_rate >= 3.0
    path = write_results("eval_throughput", {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "model_dir", "out")},
        "summary": summary, "best_sharded_x_naive": best / naive_rate, "two_vs_one_process": ratio_2_1,
        "targets": {"best_sharded_x_naive": 3.0, "metric_share_pct_below": 5.0}, "targets_met": ok,
        "results": results, "load_before": load_before, "load_after": machine_load(),
        "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(REPO)}")
    return exit_status(sanity, ok, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
