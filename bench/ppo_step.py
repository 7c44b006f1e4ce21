"""Seconds per PPO step (generation / grading / forward / update) and samples/s: this loop against TRL's GRPOTrainer.

    python bench/ppo_step.py [--steps 6] [--warmup 2] [--prompts 8] [--generations 4] [--new-tokens 16]
    python bench/ppo_step.py --smoke            # both loops, 1 warm-up + 1 timed step of 2 x 2 samples, 4 tokens

TRL 1.16 ships no PPO trainer; GRPOTrainer is its nearest online RL loop. Both run in their own fresh
process, one process each, on the built-in tiny Llama (0.8M parameters, fp32), the same copy-task prompts,
`--prompts` x `--generations` samples per step, exactly `--new-tokens` generated tokens (EOS suppressed in
both), one optimizer step over the whole batch per step, and a KL penalty to a frozen reference model (GRPO
beta 0.04; PPO kl.coef 0.04) so both run a reference forward pass:
  dft: PPORun (the path of `dft ppo`), full strategy, shared value head, rewards from a grader server
       running the python spec configs/ppo/grader_letters.yaml (sandboxed workers, over HTTP);
  trl: GRPOTrainer(use_cpu) with the same reward function called in-process.
Time per step is the median after `--warmup` steps (start-up and model loading excluded). Prints the split
of the dft step, samples/s for each and the ratio dft/trl, plus machine load; writes bench/results/ppo_step-*.json.
No speed target; exits 1 if either loop fails or trains nonsense (fewer steps than asked, responses not exactly
`--new-tokens` long or empty, non-finite losses, rewards or times, unscorable samples).
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


def worker_dft(args) -> dict:
    from distributed_ft.recipes.ppo import PPORun

    samples = args.prompts * args.generations
    overrides = [*dft_overrides("ppo", args, args.tmp / "ppo-run"), "ppo.kl.coef=0.04"]
    result = train_dft(PPORun(REPO / "configs" / "ppo" / "quickstart.yaml", overrides).build())
    every = result.rows
    return {**dft_rows_summary(result, args.warmup, samples), "vf_loss": [r["vf_loss"] for r in every],
            "kl": [r["kl"] for r in every]}


def check(sanity: Sanity, results: dict, args) -> None:
    """Both loops ran every step on the asked batch, with finite losses and times and real completions."""
    steps, samples = args.steps + args.warmup, args.prompts * args.generations
    for variant, r in results.items():
        sanity.check(r["steps_run"] == steps, f"{variant}: {r['steps_run']} steps ran, expected {steps}")
        sanity.finite(f"{variant}: seconds per step", r["step_s"], positive=True)
    dft, trl = results["dft"], results["trl"]
    sanity.check(set(dft["response_lengths"]) == {float(args.new_tokens)},
                 f"dft: response lengths {dft['response_lengths']}, expected exactly {args.new_tokens} tokens")
    sanity.check(set(dft["samples"]) == {samples}, f"dft: samples per step {dft['samples']}, expected {samples}")
    sanity.check(dft["unscorable"] == 0, f"dft: {dft['unscorable']} samples the grader could not score")
    for key in ("reward_mean", "pg_loss", "vf_loss", "kl"):
        sanity.all_finite(f"dft: {key}", dft[key])
    for key, value in dft["split_s"].items():
        sanity.finite(f"dft: time/{key}", value)
    check_trl(sanity, "trl", trl, steps, samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser)
    parser.add_argument("--worker", choices=["dft", "trl"], help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix=f"{args.worker}-bench-") as tmp:  # the run's output, removed after
            args.tmp = Path(tmp)
            result = (worker_dft if args.worker == "dft" else worker_trl)(args)
        print(MARK + json.dumps(result), flush=True)
        return 0
    load_before = machine_load()
    flags = step_flags(args)
    results = {v: run_worker(__file__, v, args, flags) for v in ("dft", "trl")}
    sanity = Sanity()
    check(sanity, results, args)
    ratio = results["dft"]["samples_per_s"] / results["trl"]["samples_per_s"]
    payload = {"args": vars(args), "results": results, "ratio_dft_over_trl": ratio,
               "load_before": load_before, "load_after": machine_load(), "sanity_failures": sanity.failures,
               "versions": versions()}
    path = write_results("ppo_step", payload, smoke=args.smoke)
    if args.smoke:
        print("SMOKE RUN (tiny sizes: the figures say nothing about speed)")
    split = results["dft"]["split_s"]
    print(f"dft PPO : {results['dft']['step_s']:.3f} s/step ({results['dft']['samples_per_s']:.1f} samples/s); "
          + ", ".join(f"{k} {v:.3f}s" for k, v in split.items() if k != "step"))
    print(f"trl GRPO: {results['trl']['step_s']:.3f} s/step ({results['trl']['samples_per_s']:.1f} samples/s)")
    print(f"ratio dft/trl samples/s: {ratio:.2f}  (load {load_before})  -> {path}")
    return exit_status(sanity, True, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
