"""Tokens/s of a DPO training step: `dft dpo` against TRL's DPOTrainer, same model, pairs, batch and precision.

    python bench/dpo_step.py [--steps 6] [--warmup 2] [--rounds 2] [--pairs 8] [--prompt-len 64]
                             [--completion-len 64] [--threads 1]
    python bench/dpo_step.py --smoke      # every variant at tiny sizes; first-step losses checked, no target

Builds a randomly initialised 4.2M-parameter fp32 Llama (hidden 256, 4 layers, vocab 2000, bench/common.py)
and synthetic pairs: a prompt of prompt-len/2..prompt-len words, chosen and rejected completions of
completion-len/2..completion-len tokens each (EOS included), every word one token. Each step is one
optimizer step over `--pairs` pairs (2 x pairs sequences), sigmoid loss, beta 0.1, a live frozen reference
(a second copy of the initial weights, a forward pass every step), AdamW at a constant learning rate,
gradient clipping 1.0, full fine-tuning, through
  dft:      DPORun(config).build().prepare().train(): the path of `dft dpo`, strategy full, fp32 (on a CPU it
            scores a batch's rows in a few passes of similar lengths, see recipes/pair_run.py);
  dft_bf16: the same with bf16 autocast (training.mixed_precision: bf16, the `auto` default on a CPU with
            native bf16);
  trl:      trl.DPOTrainer with a DPOConfig as a user writes it: use_cpu, the same batch, learning rate,
            beta and max_length, DPOConfig's defaults otherwise (bf16 autocast, gradient checkpointing,
            dropout off, its fused LM-head log-probs and per-step metrics, the batch padded to its longest row);
  trl_fp32: the same with bf16 and gradient checkpointing off: dft's computation, fair for a CPU.
TRL reads the pairs in the order dft's sampler draws them (train_sampling_strategy="sequential"), so every
step trains on the same pairs on both sides (checked: dft's drawn indices, and both sides' token totals).
Each variant runs in its own fresh process, one thread, `--rounds` times in alternating order. Tokens are the
non-padding tokens of chosen + rejected (each with its prompt); a run's throughput is the tokens of its steps
after `--warmup` over their wall time (step boundary to step boundary: start-up, model loading and
tokenization excluded), reported as the median over rounds; tokens per CPU-second of the same steps, far less
moved by other jobs on a shared machine, are printed beside it. Peak memory is each worker's peak RSS
(ru_maxrss: imports, data, model and reference included).

Checks: the first step's loss, and the mean chosen and rejected log-probs (at step one the reference equals
the policy, so the loss is log 2 whatever the batch; the log-probs say it was the same batch and weights),
equal at one precision: dft's trl_fp32's to 1e-5 relative, dft_bf16's trl's within bf16 precision (5e-2);
every run trained every step on the same tokens with finite losses. Target, each at one precision:
dft >= 1.2x the tokens/s of trl_fp32 and dft_bf16 >= 1.2x trl's. Writes bench/results/dpo_step-*.json;
exits 1 when a check fails or (full runs) the target is missed. --smoke: a 0.15M-parameter Llama, 2 pairs of
at most 8 + 8 tokens, 1 warm-up + 1 timed step, 1 round, the four workers at once (their timings say
nothing); the checks apply, the target does not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, SMALL_LLAMA, SPECIAL_TOKENS, TINY_LLAMA, Sanity, build_llama,  # noqa: E402
                          count_llama_parameters, exit_status, machine_load, median, parse_args, peak_rss_bytes,
                          run_worker, versions, word, write_results)
from bench.grpo_step import native_bf16  # noqa: E402

TARGET = 1.2            # dft tokens/s over each TRL variant's
SEED, LR, BETA = 42, 1e-5, 0.1
VARIANTS = ("dft", "dft_bf16", "trl", "trl_fp32")
SMOKE = {"steps": 1, "warmup": 1, "rounds": 1, "rows": 8, "pairs": 2, "prompt_len": 8, "completion_len": 8,
         "threads": 1, "timeout": 300}
MARK = "PAIR_BENCH_RESULT "
# Each comparison is at one precision: dft in fp32 against TRL forced to fp32, dft with bf16 autocast against
# TRL's defaults (bf16 autocast, gradient checkpointing). (dft variant, TRL variant, first-step agreement):
# fp32 to float32 summation-order noise, bf16 to bf16 precision.
COMPARISONS = {"dft/trl_fp32": ("dft", "trl_fp32", 1e-5), "dft_bf16/trl": ("dft_bf16", "trl", 5e-2)}


# ---- what both pair benchmarks share (bench/rm_step.py imports it) ----------------------------------------

def add_pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS too)")
    parser.add_argument("--rows", type=int, default=256, help="distinct training pairs")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt, tokens")
    parser.add_argument("--completion-len", type=int, default=64, help="longest completion, tokens (EOS included)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)


def make_pairs(n: int, prompt_len: int, completion_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"} texts of synthetic words, lengths drawn between half and all of the
    limits. Completions start with a space, so prompt + completion splits into exactly the words of both, and
    hold completion_len - 1 words at most: with the EOS the recipes append, completion_len tokens."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)

    def words(lo: int, hi: int) -> str:
        return " ".join(word(rng.randrange(vocab_size - first)) for _ in range(rng.randint(lo, hi)))

    c = max(completion_len - 1, 1)
    return [{"prompt": words(max(prompt_len // 2, 1), prompt_len), "chosen": " " + words(max(c // 2, 1), c),
             "rejected": " " + words(max(c // 2, 1), c)} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sampler_order(n_rows: int, batch: int, steps: int) -> list[int]:
    """The pair indices dft's PairLoop trains on, step after step (one process, no accumulation): its own
    sampler, replayed; TRL gets its rows in this order."""
    from distributed_ft.data.mixing import WeightedMixSampler

    return WeightedMixSampler([n_rows], [1.0], SEED).next_indices(batch * steps)


def pair_sources(work: Path) -> dict:
    """The `pairs` sources: a validation file keeps the training pairs in file order (nothing is split off)."""
    return {"train": [{"path": str(work / "train.jsonl")}], "validation": [{"path": str(work / "held.jsonl")}]}


def training_sections(args, work: Path, steps: int, precision: str = "no") -> dict:
    """The config sections of a dft pair run with the benchmark's batch, optimizer and quiet logging."""
    return {"model": {"name_or_path": str(work / "model")}, "strategy": {"name": "full"},
            "training": {"max_steps": steps, "micro_batch_size": args.pairs, "learning_rate": LR,
                         "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "seed": SEED,
                         "mixed_precision": precision},  # pinned, whatever the CPU's bf16 support
            "logging": {"log_every": 10 ** 6, "progress_bar": False},
            "output": {"dir": str(work / f"dft-run-{os.getpid()}"), "overwrite": True}}


def train_dft(run, tokens_of, first_keys: tuple[str, ...]) -> dict:
    """Train a built pair recipe, stamping the start of every step (each step computes its loss once, with
    no accumulation) and its pair indices; per-step tokens are counted afterwards, outside the timed loop."""
    run.prepare()
    calls: list[tuple[float, float, list[int]]] = []
    inner = run.loop.pair_loss

    def pair_loss(model, indices):
        calls.append((time.perf_counter(), time.process_time(), list(indices)))
        return inner(model, indices)

    run.loop.pair_loss = pair_loss
    try:
        result = run.train()
        end, end_cpu = time.perf_counter(), time.process_time()
    finally:
        run.close()
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next(r for r in rows if r["step"] == 1)
    starts, cpu = [t for t, _, _ in calls] + [end], [c for _, c, _ in calls] + [end_cpu]
    return {"step_s": [b - a for a, b in zip(starts, starts[1:])], "cpu_s": [b - a for a, b in zip(cpu, cpu[1:])],
            "tokens": [sum(tokens_of(run.train_pairs[i]) for i in idx) for _, _, idx in calls],
            "indices": [i for _, _, idx in calls for i in idx], "losses": result.losses,
            "first": {"loss": first["loss"], **{k: first[k] for k in first_keys}}}


def train_trl(trainer, first_keys: dict[str, str]) -> dict:
    """Train a built TRL trainer: a callback stamps every step's end and TRL's own count of the non-padding
    tokens trained so far; the first compute_loss call records the loss and `first_keys` (ours -> TRL's
    metric name) from TRL's per-step metrics. Only reads: the training itself is TRL's, unchanged."""
    from transformers import TrainerCallback

    rec: dict = {"stamps": [(time.perf_counter(), time.process_time())], "tokens": [0], "first": None}

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rec["stamps"][0] = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            rec["stamps"].append((time.perf_counter(), time.process_time()))
            rec["tokens"].append(trainer._total_train_tokens)

    inner = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        loss = inner(model, inputs, *a, **kw)
        if rec["first"] is None:
            metrics = trainer._metrics["train"]
            rec["first"] = {"loss": float(loss.detach()), **{ours: metrics[theirs][-1]
                                                             for ours, theirs in first_keys.items()}}
        return loss

    trainer.compute_loss = compute_loss
    trainer.add_callback(Stamp())
    out = trainer.train()
    stamps, tokens = rec["stamps"], rec["tokens"]
    return {"step_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
            "cpu_s": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
            "tokens": [b - a for a, b in zip(tokens, tokens[1:])], "losses": [out.training_loss],
            "first": rec["first"], "bf16": trainer.args.bf16,
            "gradient_checkpointing": trainer.args.gradient_checkpointing, "optim": str(trainer.args.optim)}


def trl_common_args(args, work: Path, fp32: bool) -> dict:
    """The TrainingArguments both TRL trainers get: the benchmark's batch and optimizer, no eval, saving or
    logging, rows in dft's order; bf16 and gradient checkpointing left at TRL's defaults unless `fp32`."""
    return dict(output_dir=str(work / f"trl-run-{os.getpid()}"), use_cpu=True, per_device_train_batch_size=args.pairs,
                max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, seed=SEED, train_sampling_strategy="sequential",
                logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
                dataloader_num_workers=0, **({"bf16": False, "gradient_checkpointing": False} if fp32 else {}))


def worker_main(args, workers: dict) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = workers[args.worker](args, args.work)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(MARK + json.dumps(result), flush=True)
    return 0


def launch(script: str, variant: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(key, None)  # one plain process, whatever the calling shell holds
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
             ("steps", "warmup", "threads", "rows", "pairs", "prompt_len", "completion_len")]
    return run_worker([sys.executable, script, "--worker", variant, "--work", str(args.work), *flags], env,
                      args.timeout, variant, MARK)


def measure(r: dict, warmup: int) -> dict:
    """Tokens/s over the steps after the warm-up (their tokens over their summed wall time)."""
    times, cpu, tokens = r["step_s"][warmup:], r["cpu_s"][warmup:], r["tokens"][warmup:]
    if not times:
        raise SystemExit("no steps left after warm-up; raise --steps")
    return {"steps_run": len(r["step_s"]), "tokens_per_s": sum(tokens) / sum(times), "timed_s": sum(times),
            "tokens_per_cpu_s": sum(tokens) / sum(cpu),
            "timed_tokens": sum(tokens), "median_step_s": median(times), "step_tokens": r["tokens"],
            "peak_rss_mb": r["peak_rss_bytes"] / 2 ** 20, "first": r["first"], "losses": r["losses"],
            **{k: r[k] for k in ("bf16", "gradient_checkpointing", "optim") if k in r}}


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (at least 0.01, so that figures near zero compare absolutely)."""
    return abs(a - b) / max(abs(a), abs(b), 1e-2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_benchmark(name: str, script: str, args, build_work, describe: str) -> int:
    """Build the shared model and data once, run every variant `--rounds` times (alternating order, each in
    a fresh process), check the first steps agree and every run trained sanely, report and judge the target."""
    arch = TINY_LLAMA if args.smoke else SMALL_LLAMA
    sanity = Sanity()
    load_before = machine_load()
    total_steps = args.warmup + args.steps
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix=f"dft-{name}-bench-") as tmp:
        args.work = Path(tmp)
        build_work(args, args.work, arch)
        expected = sampler_order(args.rows, args.pairs, total_steps)
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # drift in load hits all alike
            if args.smoke:  # its timings say nothing, so its variants run at once: seconds, not a minute
                with ThreadPoolExecutor(len(order)) as pool:
                    raws = dict(zip(order, pool.map(lambda v: launch(script, v, args), order)))
            for variant in order:
                raw = raws[variant] if args.smoke else launch(script, variant, args)
                if variant.startswith("dft"):
                    sanity.check(raw["indices"] == expected, f"{variant}: trained on other pairs than its "
                                                             "sampler's replayed order (the one TRL was given)")
                m = {"round": r + 1, **measure(raw, args.warmup)}
                runs[variant].append(m)
                print(f"round {r + 1} {variant:>8}: {m['tokens_per_s']:8.0f} tokens/s (median step "
                      f"{m['median_step_s'] * 1000:.0f} ms), peak RSS {m['peak_rss_mb']:.0f} MiB", flush=True)
    load_after = machine_load()

    for variant, measured in runs.items():
        for m in measured:
            tag = f"{variant} round {m['round']}"
            sanity.check(m["steps_run"] == total_steps, f"{tag}: {m['steps_run']} steps ran, expected {total_steps}")
            sanity.all_finite(f"{tag}: losses", m["losses"])
            sanity.finite(f"{tag}: tokens/s", m["tokens_per_s"], positive=True)
            sanity.check(m["step_tokens"] == runs["dft"][0]["step_tokens"],  # the same batches, step by step
                         f"{tag}: tokens per step {m['step_tokens']}, dft's {runs['dft'][0]['step_tokens']}")
    first = {v: runs[v][0]["first"] for v in VARIANTS}
    agreement = {key: {k: rel_diff(first[ours][k], first[theirs][k]) for k in first[ours]}
                 for key, (ours, theirs, _) in COMPARISONS.items()}
    for key, diffs in agreement.items():
        ours, theirs, tolerance = COMPARISONS[key]
        for k, d in diffs.items():
            sanity.check(math.isfinite(d) and d <= tolerance,
                         f"first step {k}: {ours} {first[ours][k]!r} vs {theirs} {first[theirs][k]!r} (relative "
                         f"difference {d:.2e} > {tolerance:g})")

    tps = {v: median([m["tokens_per_s"] for m in runs[v]]) for v in VARIANTS}
    rss = {v: median([m["peak_rss_mb"] for m in runs[v]]) for v in VARIANTS}
    ratios = {key: tps[ours] / tps[theirs] for key, (ours, theirs, _) in COMPARISONS.items()}
    # tokens per CPU-second of the (single-threaded) workers: far less moved by other jobs on a shared machine
    cpu_tps = {v: median([m["tokens_per_cpu_s"] for m in runs[v]]) for v in VARIANTS}
    cpu_ratios = {key: cpu_tps[ours] / cpu_tps[theirs] for key, (ours, theirs, _) in COMPARISONS.items()}
    memory_ratios = {key: rss[ours] / rss[theirs] for key, (ours, theirs, _) in COMPARISONS.items()}
    met = min(ratios.values()) >= TARGET
    params = count_llama_parameters(**arch)
    print(f"\n{'SMOKE RUN (tiny sizes, target not checked): ' if args.smoke else ''}{describe}; model "
          f"{params / 1e6:.2f}M parameters fp32, {args.pairs} pairs a step (prompt <= {args.prompt_len}, completions "
          f"<= {args.completion_len} tokens), {args.threads} threads, {args.steps} timed steps after {args.warmup} "
          f"warm-up, median of {args.rounds} rounds")
    for v in VARIANTS:
        r0 = runs[v][0]
        how = (f" (bf16 autocast {v == 'dft_bf16'})" if v.startswith("dft")
               else f" (bf16 {r0['bf16']}, gradient checkpointing {r0['gradient_checkpointing']})")
        print(f"  {v:>8}: {tps[v]:8.0f} tokens/s, peak RSS {rss[v]:6.0f} MiB{how}; first step "
              + ", ".join(f"{k} {x:.6f}" for k, x in first[v].items()))
    for key, ratio in ratios.items():
        verdict = "not checked in a smoke run" if args.smoke else ("ok" if ratio >= TARGET else "MISSED")
        print(f"  {key:>13}: {ratio:.2f}x tokens/s (target >= {TARGET}x: {verdict}), {memory_ratios[key]:.2f}x "
              f"peak RSS; {cpu_ratios[key]:.2f}x tokens per CPU-second")
    print("  first-step relative differences: " + "; ".join(
        f"{v}: " + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()) for v, diffs in agreement.items()))
    print(f"  CPU {cpu_model()}, native bf16 (avx512_bf16): {native_bf16()}; load average (1m) "
          f"{load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, {load_after['cpus']} cpus")
    args_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_results(name, {
        "args": args_out, "model": {**arch, "parameters": params, "dtype": "fp32"}, "tokens_per_s": tps,
        "peak_rss_mb": rss, "ratios": ratios, "memory_ratios": memory_ratios, "tokens_per_cpu_s": cpu_tps,
        "cpu_time_ratios": cpu_ratios, "target": TARGET, "target_met": met,
        "first_step": first, "first_step_rel_diff": agreement, "comparisons": COMPARISONS, "runs": runs,
        "cpu": cpu_model(), "native_bf16": native_bf16(), "load_before": load_before, "load_after": load_after,
        "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"  results: {path.relative_to(REPO)}")
    return exit_status(sanity, met, args.smoke)


# ---- DPO ------------------------------------------------------------------------------------------------

def build_work(args, work: Path, arch: dict) -> None:
    build_llama(work / "model", max_position_embeddings=2 * (args.prompt_len + args.completion_len), **arch)
    pairs = make_pairs(args.rows + 2, args.prompt_len, args.completion_len, arch["vocab_size"])
    write_jsonl(work / "train.jsonl", pairs[:args.rows])
    write_jsonl(work / "held.jsonl", pairs[args.rows:])  # see pair_sources


def lm_tokens(pair: dict) -> int:
    """Non-padding tokens a tokenized DPO pair puts in the batch: the prompt under each side, both sides."""
    return 2 * len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])


def worker_dft(args, work: Path, precision: str = "no") -> dict:
    import yaml

    from distributed_ft.recipes.dpo import DPORun

    config = {**training_sections(args, work, args.warmup + args.steps, precision),
              "pairs": {**pair_sources(work),
                        "max_length": args.prompt_len + args.completion_len, "max_prompt_length": args.prompt_len},
              "dpo": {"loss": "sigmoid", "beta": BETA, "reference": "live"}}
    path = work / f"dpo-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return train_dft(DPORun(str(path)).build(), lm_tokens, ("logps/chosen", "logps/rejected"))


def worker_trl(args, work: Path, fp32: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    order = sampler_order(len(pairs), args.pairs, args.warmup + args.steps)
    config = DPOConfig(**trl_common_args(args, work, fp32), beta=BETA, loss_type=["sigmoid"],
                       max_length=args.prompt_len + args.completion_len)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    trainer = DPOTrainer(model=str(work / "model"), args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([pairs[i] for i in order]))
    return train_trl(trainer, {"logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected"})


WORKERS = {"dft": worker_dft, "dft_bf16": lambda args, work: worker_dft(args, work, "bf16"), "trl": worker_trl,
           "trl_fp32": lambda args, work: worker_trl(args, work, fp32=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(parser)
    args = parse_args(parser, SMOKE)
    if args.worker:
        return worker_main(args, WORKERS)
    return run_benchmark("dpo_step", __file__, args, build_work, f"DPO (sigmoid, beta {BETA}, live reference)")


if __name__ == "__main__":
    sys.exit(main())
