"""What the RL step benchmarks (ppo_step.py, grpo_step.py) share: the copy-task prompts and reward, TRL's
GRPOTrainer as the loop a user would pick instead, and running each loop in its own fresh process."""
from __future__ import annotations

import os
import sys
import time

from bench.common import median
from bench.common import run_worker as common_run_worker

MARK = "RL_BENCH_RESULT "


STEP_OPTIONS = (("steps", 6), ("warmup", 2), ("prompts", 8), ("generations", 4), ("new_tokens", 16), ("threads", 2))


def add_step_args(parser) -> None:
    """The batch and timing options every RL step benchmark takes."""
    for name, default in STEP_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per worker")


def step_flags(args) -> list[str]:
    """The same options, as flags for a worker process."""
    return [flag for name, _ in STEP_OPTIONS for flag in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def letters_reward(text: str, reference: str) -> float:
    """The reward of configs/ppo/grader_letters.yaml, as a plain function."""
    out = text.replace(" ", "")
    if not out:
        return 0.0
    want = set(reference.replace(" ", ""))
    return sum(c in want for c in out) / len(out)


def copy_prompts(n: int) -> list[dict]:
    from distributed_ft.data.builtin import builtin_rows

    return [{"prompt": r["prompt"], "reference": r["completion"].strip()} for r in builtin_rows("copy", n, 0)]


def worker_trl(args, *, loss_type: str | None = None, beta: float = 0.04, fast: bool = False) -> dict:
    """TRL GRPOTrainer on the built-in tiny Llama: `--prompts` x `--generations` samples a step, exactly
    `--new-tokens` tokens each (EOS suppressed), one optimizer step per generation batch. `fast`: bf16 and
    activation checkpointing off (TRL turns both on by default); `loss_type` None keeps TRL's default."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from distributed_ft.models.builtin import builtin_model_path

    path = builtin_model_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.eos_token_id = None  # exactly --new-tokens per sample
    ds = datasets.Dataset.from_list(copy_prompts(512))
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

    options = dict(bf16=False, gradient_checkpointing=False) if fast else {}
    if loss_type is not None:
        options["loss_type"] = loss_type
    config = GRPOConfig(output_dir=str(args.tmp / "grpo-run"), use_cpu=True, per_device_train_batch_size=samples,
                        num_generations=args.generations, max_completion_length=args.new_tokens,
                        max_steps=args.steps + args.warmup, learning_rate=5e-4, beta=beta, logging_steps=1000,
                        report_to="none", save_strategy="no", temperature=1.0, top_k=0, seed=0,
                        dataloader_num_workers=0, disable_tqdm=True, **options)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[Timer()])
    out = trainer.train()
    step = median(times[args.warmup:])
    return {"step_s": step, "samples_per_s": samples / step, "steps_run": len(times),
            "train_loss": out.training_loss, "completions_graded": len(completion_chars),
            "nonempty_completions": sum(n > 0 for n in completion_chars),
            "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
            "loss_type": config.loss_type}


def run_worker(script: str, variant: str, args, flags: list[str]) -> dict:
    """Run `script --worker variant` in a fresh process and return the JSON it prints after MARK."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return common_run_worker([sys.executable, script, "--worker", variant, *flags], env, args.timeout, variant, MARK)


def train_dft(run):
    """Train a built RL recipe (PPORun / GRPORun) generating exactly max_new_tokens per sample, like TRL here:
    generation never stops early."""
    run.model.policy.generation_config.eos_token_id = None
    try:
        run.prepare()
        run.trainer.eos_id = None
        run.trainer.objective.eos_id = None
        return run.train()
    finally:
        run.close()


def dft_overrides(section: str, args, out) -> list[str]:
    """The overrides that give a dft RL run the benchmark's batch: one optimizer step per rollout, no eval."""
    samples = args.prompts * args.generations
    return [f"output.dir={out}", f"training.max_steps={args.steps + args.warmup}",
            f"{section}.rollout_batch_size={args.prompts}", f"{section}.num_generations={args.generations}",
            f"{section}.max_new_tokens={args.new_tokens}", f"{section}.ppo_epochs=1",
            f"training.micro_batch_size={samples}", "training.gradient_accumulation_steps=1",
            f"{section}.eval_prompts=0", "data.validation_fraction=0", "training.checkpoint_every=null",
            "logging.progress_bar=false", "logging.log_every=1", f"{section}.sample_every=1000000",
            "data.train.0.num_examples=512"]


def dft_rows_summary(result, warmup: int, samples: int) -> dict:
    """Median time split and sanity fields of a dft RL run's logged rows (warm-up steps excluded)."""
    rows = result.rows[warmup:]
    split = {k: median([r[f"time/{k}"] for r in rows]) for k in ("generation", "forward", "grading_wait",
                                                                 "update", "step")}
    split["grader_latency"] = median([r["grader_latency_s"] for r in rows])
    every = result.rows  # all steps, warm-up included, for the sanity checks
    return {"step_s": split["step"], "split_s": split, "samples_per_s": samples / split["step"],
            "response_length": median([r["response_length"] for r in rows]), "steps_run": result.step,
            "response_lengths": [r["response_length"] for r in every],
            "samples": [r["samples"] for r in every], "unscorable": sum(r["unscorable"] for r in every),
            "reward_mean": [r["reward_mean"] for r in every], "pg_loss": [r["pg_loss"] for r in every]}


def check_trl(sanity, name: str, r: dict, steps: int, samples: int) -> None:
    sanity.finite(f"{name}: train loss", r["train_loss"])
    sanity.check(r["completions_graded"] >= steps * samples,
                 f"{name}: {r['completions_graded']} completions rewarded, expected at least {steps * samples}")
    sanity.check(r["nonempty_completions"] > 0, f"{name}: every completion was empty")
