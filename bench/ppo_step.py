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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, Sanity, exit_status, machine_load, median, parse_args, versions,  # noqa: E402
                          write_results)

MARK = "PPO_BENCH_RESULT "
SMOKE = {"steps": 1, "warmup": 1, "prompts": 2, "generations": 2, "new_tokens": 4, "threads": 1, "timeout": 300}


def letters_reward(text: str, reference: str) -> float:
    """The reward of configs/ppo/grader_letters.yaml, as a plain function."""
    out = text.replace(" ", "")
    if not out:
        return 0.0
    want = set(reference.replace(" ", ""))
    return sum(c in want for c in out) / len(out)


def _prompts(n: int) -> list[dict]:
    from distributed_ft.data.builtin import builtin_rows

    return [{"prompt": r["prompt"], "reference": r["completion"].strip()} for r in builtin_rows("copy", n, 0)]


def worker_dft(args) -> dict:
    from distributed_ft.recipes.ppo import PPORun

    out = args.tmp / "ppo-run"
    steps = args.steps + args.warmup
    samples = args.prompts * args.generations
    overrides = [f"output.dir={out}", f"training.max_steps={steps}", f"ppo.rollout_batch_size={args.prompts}",
                 f"ppo.num_generations={args.generations}", f"ppo.max_new_tokens={args.new_tokens}",
                 "ppo.ppo_epochs=1", f"training.micro_batch_size={samples}", "training.gradient_accumulation_steps=1",
                 "ppo.kl.coef=0.04", "ppo.eval_prompts=0", "data.validation_fraction=0",
                 "training.checkpoint_every=null",
                 "logging.progress_bar=false", "logging.log_every=1", "ppo.sample_every=1000000",
                 "data.train.0.num_examples=512"]
    run = PPORun(REPO / "configs" / "ppo" / "quickstart.yaml", overrides).build()
    # Exactly --new-tokens per sample, like TRL below: generation never stops early.
    run.model.policy.generation_config.eos_token_id = None
    try:
        run.prepare()
        run.trainer.eos_id = None
        result = run.train()
    finally:
        run.close()
    rows = result.rows[args.warmup:]
    split = {k: median([r[f"time/{k}"] for r in rows]) for k in ("generation", "forward", "grading_wait",
                                                                 "update", "step")}
    split["grader_latency"] = median([r["grader_latency_s"] for r in rows])
    every = result.rows  # all steps, warm-up included, for the sanity checks
    return {"step_s": split["step"], "split_s": split, "samples_per_s": samples / split["step"],
            "response_length": median([r["response_length"] for r in rows]), "steps_run": result.step,
            "response_lengths": [r["response_length"] for r in every],
            "samples": [r["samples"] for r in every], "unscorable": sum(r["unscorable"] for r in every),
            "reward_mean": [r["reward_mean"] for r in every], "pg_loss": [r["pg_loss"] for r in every],
            "vf_loss": [r["vf_loss"] for r in every], "kl": [r["kl"] for r in every]}


def worker_trl(args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from distributed_ft.models.builtin import builtin_model_path

    path = builtin_model_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.eos_token_id = None  # exactly --new-tokens per sample
    rows = _prompts(512)
    ds = datasets.Dataset.from_list(rows)
    samples = args.prompts * args.generations

    completion_chars: list[int] = []

    def reward(completions, reference, **kwargs):
        completion_chars.extend(len(c.strip()) for c in completions)
        return [letters_reward(c, r) for c, r in zip(completions, reference)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    out = str(args.tmp / "grpo-run")
    config = GRPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=samples,
                        num_generations=args.generations, max_completion_length=args.new_tokens,
                        max_steps=args.steps + args.warmup, learning_rate=5e-4, beta=0.04, logging_steps=1000,
                        report_to="none", save_strategy="no", temperature=1.0, top_k=0, seed=0,
                        dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[Timer()])
    out = trainer.train()
    step = median(times[args.warmup:])
    return {"step_s": step, "samples_per_s": samples / step, "steps_run": len(times),
            "train_loss": out.training_loss, "completions_graded": len(completion_chars),
            "nonempty_completions": sum(n > 0 for n in completion_chars)}


def run_worker(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--prompts", str(args.prompts), "--generations", str(args.generations),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{variant} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


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
    sanity.finite("trl: train loss", trl["train_loss"])
    sanity.check(trl["completions_graded"] >= steps * samples,
                 f"trl: {trl['completions_graded']} completions rewarded, expected at least {steps * samples}")
    sanity.check(trl["nonempty_completions"] > 0, "trl: every completion was empty")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per worker")
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
    results = {v: run_worker(v, args) for v in ("dft", "trl")}
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
