"""Training throughput of the engine against TRL's SFTTrainer and a plain PyTorch loop, same model and data.

    python bench/sft_throughput.py [--steps 10] [--warmup 3] [--rounds 2] [--threads 2]
    python bench/sft_throughput.py --smoke      # every variant once at tiny sizes; targets not checked

Builds a randomly initialised 4.2M-parameter fp32 Llama (hidden 256, 4 layers, vocab 2000) and rows of
exactly 256 tokens, then trains batch 16 x 256 with AdamW through
  engine:   SFTRun(config).build().train(), one process, the path of `dft train`, its defaults;
  trl:      trl.SFTTrainer on the pre-tokenised rows as a user runs it: use_cpu and SFTConfig's defaults for
            precision and memory (bf16 autocast, activation checkpointing), no eval, no saving, logging off;
  trl_fp32: the same SFTTrainer forced to the engine's computation (fp32, no activation checkpointing): a
            like-for-like diagnostic that separates TRL's defaults from its per-step overhead; no target;
  plain:    model(input_ids, labels=input_ids).loss.backward(); AdamW step; zero_grad.
Each variant runs in its own fresh process, one after the other, `--rounds` times alternating; a run's
throughput is 4096 tokens over its median step time after `--warmup` steps (start-up, model loading and
data preparation excluded), and the reported figure is the median over rounds. Prints tokens/s, the ratios
and the machine load; writes bench/results/sft_throughput-*.json.
Exits 1 when engine < 1.5x trl or engine < 0.8x plain, or when a run did not train sanely (fewer steps
than asked, a non-finite loss). --smoke: a 0.15M-parameter Llama, batch 2 x 32, 1 warm-up + 1 timed step,
1 round, through all four variants; only the sanity checks decide its exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, SMALL_LLAMA, TINY_LLAMA, Sanity, build_llama, count_llama_parameters,  # noqa: E402
                          exit_status, machine_load, median, parse_args, run_worker, synthetic_rows, versions,
                          write_results, write_text_jsonl)

BATCH, SEQ_LEN, LR = 16, 256, 1e-4  # the benchmark's batch (--batch-size) and row length (--seq-len)
SMOKE = {"steps": 1, "warmup": 1, "rounds": 1, "rows": 8, "batch_size": 2, "seq_len": 32, "threads": 1,
         "timeout": 300}
VARIANTS = ("engine", "trl", "trl_fp32", "plain")
TARGETS = {"trl": 1.5, "plain": 0.8}  # engine tokens/s must reach this multiple of each
ROW_MARK = "SFT_BENCH_RESULT "


# ---- workers: each runs in its own process and prints one JSON line -------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_engine(work: Path, steps: int, threads: int, batch: int, seq_len: int) -> dict:
    import yaml

    from distributed_ft.recipes.sft import SFTRun

    _set_threads(threads)
    stamps: list[float] = []
    config = {
        "model": {"name_or_path": str(work / "model")},
        "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": seq_len,
                 "loss_on": "all"},
        "strategy": {"name": "full"},
        "training": {"max_steps": steps, "micro_batch_size": batch, "learning_rate": LR, "optimizer": "adamw",
                     "lr_scheduler": "constant", "warmup_steps": 0},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "eval": {"enabled": False},
        "output": {"dir": str(work / "engine-run"), "overwrite": True},
    }
    (work / "engine.yaml").write_text(yaml.safe_dump(config))
    run = SFTRun(str(work / "engine.yaml")).build()
    lengths = {len(ex["input_ids"]) for ex in run.data.train}
    if lengths != {seq_len}:
        raise SystemExit(f"engine rows are not all {seq_len} tokens: lengths {sorted(lengths)[:5]}")
    run.prepare()
    engine_on_step = run.trainer.on_step

    def on_step(step):  # the time each step ended, after everything the engine does per step
        if engine_on_step is not None:
            engine_on_step(step)
        stamps.append(time.perf_counter())

    run.trainer.on_step = on_step
    start = time.perf_counter()
    try:
        result = run.train()
    finally:
        run.close()
    return {"start": start, "stamps": stamps, "tokens_per_step": batch * seq_len, "losses": result.losses}


def run_trl(work: Path, steps: int, threads: int, batch: int, seq_len: int, fp32: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    _set_threads(threads)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    rows = json.loads((work / "rows.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    args = SFTConfig(output_dir=str(work / "trl-run"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                     weight_decay=0.0, max_grad_norm=1.0, max_length=seq_len, packing=False, use_cpu=True,
                     # SFTConfig's defaults are bf16 autocast and activation checkpointing; trl_fp32 turns
                     # them off to run the engine's computation.
                     **({"bf16": False, "fp16": False, "activation_checkpointing": False} if fp32 else {}),
                     logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to=[],
                     disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer, callbacks=[Stamp()])
    lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    if lengths != {seq_len}:
        raise SystemExit(f"TRL rows are not all {seq_len} tokens: lengths {sorted(lengths)[:5]}")
    start = time.perf_counter()
    out = trainer.train()
    # TRL counts the tokens it trained on; they must equal the engine's.
    if trainer._total_train_tokens != steps * batch * seq_len:
        raise SystemExit(f"TRL trained {trainer._total_train_tokens} tokens, expected {steps * batch * seq_len}")
    return {"start": start, "stamps": stamps, "tokens_per_step": batch * seq_len, "losses": [out.training_loss]}


def run_plain(work: Path, steps: int, threads: int, batch: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    _set_threads(threads)
    torch.manual_seed(42)
    rows = torch.tensor(json.loads((work / "rows.json").read_text()), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(42)
    stamps, losses = [], []
    start = time.perf_counter()
    for _ in range(steps):
        ids = rows[torch.randint(len(rows), (batch,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "tokens_per_step": batch * seq_len, "losses": losses}


def run_trl_fp32(work: Path, steps: int, threads: int, batch: int, seq_len: int) -> dict:
    return run_trl(work, steps, threads, batch, seq_len, fp32=True)


WORKERS = {"engine": run_engine, "trl": run_trl, "plain": run_plain, "trl_fp32": run_trl_fp32}


# ---- orchestration ------------------------------------------------------------------------------------------

def steady_state(result: dict, warmup: int) -> dict:
    """Tokens/s over the steps after `warmup`: from the median step time, and from the mean for reference."""
    stamps = [result["start"]] + result["stamps"]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    if not intervals:
        raise SystemExit("no steps left after warm-up; raise --steps")
    tokens = result["tokens_per_step"]
    return {"steps_run": len(result["stamps"]), "steps_timed": len(intervals), "median_step_s": median(intervals),
            "tokens_per_s": tokens / median(intervals), "tokens_per_s_mean": tokens * len(intervals) / sum(intervals),
            "losses": result["losses"]}


def check_run(sanity: Sanity, variant: str, measured: dict, args) -> None:
    """A run must have trained every step it was asked for, with finite losses and a positive rate."""
    name = f"{variant} round {measured['round']}"
    sanity.check(measured["steps_run"] == args.warmup + args.steps,
                 f"{name}: {measured['steps_run']} steps ran, expected {args.warmup + args.steps}")
    sanity.all_finite(f"{name}: losses", measured["losses"])
    sanity.finite(f"{name}: tokens/s", measured["tokens_per_s"], positive=True)


def launch_worker(variant: str, work: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(key, None)  # one plain process, whatever the calling shell holds
    cmd = [sys.executable, __file__, "--worker", variant, "--work", str(work),
           "--steps", str(args.warmup + args.steps), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    return run_worker(cmd, env, args.timeout, variant, ROW_MARK)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per run")
    parser.add_argument("--rows", type=int, default=256, help="distinct training rows")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="rows per optimizer step")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per row")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)

    if args.worker:
        result = WORKERS[args.worker](args.work, args.steps, args.threads, args.batch_size, args.seq_len)
        print(ROW_MARK + json.dumps(result), flush=True)
        return 0

    arch = TINY_LLAMA if args.smoke else SMALL_LLAMA
    tokens_per_step = args.batch_size * args.seq_len
    sanity = Sanity()
    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="dft-sft-bench-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=args.seq_len * 2, **arch)
        rows = synthetic_rows(args.rows, args.seq_len, arch["vocab_size"])
        (work / "rows.json").write_text(json.dumps(rows))
        write_text_jsonl(work / "train.jsonl", rows)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # alternate so drift in load hits all alike
            for variant in order:
                measured = {"round": r + 1, **steady_state(launch_worker(variant, work, args), args.warmup)}
                check_run(sanity, variant, measured, args)
                runs[variant].append(measured)
                print(f"round {r + 1} {variant:>8}: {measured['tokens_per_s']:9.0f} tokens/s "
                      f"(median step {measured['median_step_s'] * 1000:.0f} ms)", flush=True)
    load_after = machine_load()

    tps = {v: median([m["tokens_per_s"] for m in measured]) for v, measured in runs.items()}
    ratios = {f"engine/{v}": tps["engine"] / tps[v] for v in tps if v != "engine"}
    ok = {f"engine/{v}": ratios[f"engine/{v}"] >= target for v, target in TARGETS.items()}
    params = count_llama_parameters(**arch)
    print(f"\n{'SMOKE RUN (tiny sizes, targets not checked): ' if args.smoke else ''}"
          f"model {params / 1e6:.2f}M parameters fp32, batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
          f"{args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, median of {args.rounds}")
    for v in tps:
        print(f"  {v:>8}: {tps[v]:9.0f} tokens/s")
    for v, target in TARGETS.items():
        name = f"engine/{v}"
        verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok[name] else "MISSED")
        print(f"  {name:>12}: {ratios[name]:.2f}x  (target >= {target}x: {verdict})")
    print(f"  engine/trl_fp32: {ratios['engine/trl_fp32']:.2f}x  (TRL forced to fp32 without activation "
          f"checkpointing: like for like, no target)")
    print(f"  load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("sft_throughput", {
        "model": {**arch, "parameters": params, "dtype": "fp32"},
        "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens_per_step": tokens_per_step,
        "threads": args.threads, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "tokens_per_s": tps, "ratios": ratios,
        "targets": TARGETS, "targets_met": ok, "runs": runs, "load_before": load_before,
        "load_after": load_after, "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"  results: {path.relative_to(REPO)}")
    return exit_status(sanity, all(ok.values()), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
