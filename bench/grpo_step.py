"""Samples/s of a GRPO step (generation / grading / forward / update): `dft grpo` against TRL's GRPOTrainer.

    python bench/grpo_step.py [--steps 6] [--warmup 2] [--prompts 8] [--generations 4] [--new-tokens 16]
                              [--loss-type grpo|dr_grpo|dapo] [--beta 0.04]
    python bench/grpo_step.py --smoke          # every loop, 1 warm-up + 1 timed step of 2 x 2 samples, 4 tokens

Each loop runs in its own fresh process, one process each, on the built-in tiny Llama (0.8M parameters,
fp32 weights), the same copy-task prompts, `--prompts` x `--generations` samples per step, exactly
`--new-tokens` generated tokens (EOS suppressed in all), one optimizer step over the whole batch per step
(on-policy), the same loss type and the same KL to a frozen reference (beta; k3 in the loss, so every loop
runs a reference forward pass):
  dft:      GRPORun (the path of `dft grpo`), full strategy, rewards from a grader server running the python
            spec configs/ppo/grader_letters.yaml (sandboxed workers, over HTTP);
  trl:      GRPOTrainer(use_cpu) with its defaults (bf16 autocast, activation checkpointing), the same reward
            function called in-process: what a user gets;
  trl_fast: the same with bf16 and activation checkpointing off, TRL's fastest setting on a CPU.
Time per step is the median after `--warmup` steps (start-up and model loading excluded). Prints the dft
split, samples/s for each, the ratios dft/trl and dft/trl_fast, the CPU's native-bf16 flag and machine load;
writes bench/results/grpo_step-*.json. Target: dft at least 2x TRL's samples/s (both ratios are reported:
TRL's default bf16 is emulated, and slow, on a CPU without avx512_bf16). Exits 1 if a loop fails or trains
nonsense (fewer steps than asked, responses not exactly `--new-tokens` long, non-finite losses, rewards or
times, unscorable samples), or (full runs) the target is missed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Sanity, exit_status, machine_load, parse_args, versions, write_results  # noqa: E402
from bench.rl_common import (MARK, add_step_args, check_trl, dft_overrides, dft_rows_summary,  # noqa: E402
                             run_worker, step_flags, train_dft, worker_trl)

SMOKE = {"steps": 1, "warmup": 1, "prompts": 2, "generations": 2, "new_tokens": 4, "threads": 1, "timeout": 300}
TARGET = 2.0
ALGORITHM = {"grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo"}  # TRL loss type -> our algorithm


def native_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def worker_dft(args) -> dict:
    from distributed_ft.recipes.grpo import GRPORun

    samples = args.prompts * args.generations
    # DAPO's dynamic sampling and overlong shaping change what a step is; TRL's dapo loss type has neither.
    overrides = [*dft_overrides("grpo", args, args.tmp / "grpo-run"), f"grpo.algorithm={ALGORITHM[args.loss_type]}",
                 f"grpo.kl.beta={args.beta}", "grpo.kl.mode=loss", "grpo.kl.estimator=k3",
                 "grpo.dynamic_sampling.enabled=false", "grpo.overlong.mode=none"]
    result = train_dft(GRPORun(REPO / "configs" / "grpo" / "quickstart.yaml", overrides).build())
    return {**dft_rows_summary(result, args.warmup, samples), "kl": [r["kl"] for r in result.rows]}


def check(sanity: Sanity, results: dict, args) -> None:
    """Every loop ran every step on the asked batch, with finite losses and times and real completions."""
    steps, samples = args.steps + args.warmup, args.prompts * args.generations
    for variant, r in results.items():
        sanity.check(r["steps_run"] == steps, f"{variant}: {r['steps_run']} steps ran, expected {steps}")
        sanity.finite(f"{variant}: seconds per step", r["step_s"], positive=True)
    dft = results["dft"]
    sanity.check(set(dft["response_lengths"]) == {float(args.new_tokens)},
                 f"dft: response lengths {dft['response_lengths']}, expected exactly {args.new_tokens} tokens")
    sanity.check(set(dft["samples"]) == {samples}, f"dft: samples per step {dft['samples']}, expected {samples}")
    sanity.check(dft["unscorable"] == 0, f"dft: {dft['unscorable']} samples the grader could not score")
    for key in ("reward_mean", "pg_loss") + (("kl",) if args.beta > 0 else ()):
        sanity.all_finite(f"dft: {key}", dft[key])
    for key, value in dft["split_s"].items():
        sanity.finite(f"dft: time/{key}", value)
    for name in ("trl", "trl_fast"):
        check_trl(sanity, name, results[name], steps, samples)
        sanity.check(results[name]["loss_type"] == args.loss_type, f"{name}: ran loss type {results[name]['loss_type']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser)
    parser.add_argument("--loss-type", choices=sorted(ALGORITHM), default="grpo")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--worker", choices=["dft", "trl", "trl_fast"], help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix=f"{args.worker}-bench-") as tmp:  # the run's output, removed after
            args.tmp = Path(tmp)
            if args.worker == "dft":
                result = worker_dft(args)
            else:
                result = worker_trl(args, loss_type=args.loss_type, beta=args.beta, fast=args.worker == "trl_fast")
        print(MARK + json.dumps(result), flush=True)
        return 0
    load_before = machine_load()
    flags = [*step_flags(args), "--loss-type", args.loss_type, "--beta", str(args.beta)]
    results = {v: run_worker(__file__, v, args, flags) for v in ("dft", "trl", "trl_fast")}
    sanity = Sanity()
    check(sanity, results, args)
    ratios = {f"dft/{v}": results["dft"]["samples_per_s"] / results[v]["samples_per_s"] for v in ("trl", "trl_fast")}
    met = min(ratios.values()) >= TARGET
    payload = {"args": vars(args), "results": results, "ratios": ratios, "target": TARGET, "target_met": met,
               "native_bf16": native_bf16(), "load_before": load_before, "load_after": machine_load(),
               "sanity_failures": sanity.failures, "versions": versions()}
    path = write_results("grpo_step", payload, smoke=args.smoke)
    if args.smoke:
        print("SMOKE RUN (tiny sizes: the figures say nothing about speed)")
    split = results["dft"]["split_s"]
    print(f"dft GRPO ({args.loss_type}, beta {args.beta}): {results['dft']['step_s']:.3f} s/step "
          f"({results['dft']['samples_per_s']:.1f} samples/s); "
          + ", ".join(f"{k} {v:.3f}s" for k, v in split.items() if k != "step"))
    for v in ("trl", "trl_fast"):
        r = results[v]
        print(f"{v:9s}: {r['step_s']:.3f} s/step ({r['samples_per_s']:.1f} samples/s; bf16 {r['bf16']}, "
              f"activation checkpointing {r['gradient_checkpointing']})")
    print("ratios samples/s: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
          + f" (target {TARGET}x; CPU native bf16: {native_bf16()}; load {load_before}) -> {path}")
    return exit_status(sanity, met, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
