"""Training throughput of the engine against TRL's SFTTrainer and a plain PyTorch loop, same model and data.

    python bench/sft_throughput.py [--steps 10] [--warmup 3] [--rounds 2] [--threads 2]

Builds a randomly initialised 4.2M-parameter fp32 Llama (hidden 256, 4 layers, vocab 2000) and rows of
exactly 256 tokens, then trains batch 16 x 256 with AdamW through
  engine:   TrainingRun(config).build().train(), one process, the path of `dft train`, its defaults;
  trl:      trl.SFTTrainer on the pre-tokenised rows as a user runs it: use_cpu and SFTConfig's defaults for
            precision and memory (bf16 autocast, activation checkpointing), no eval, no saving, logging off;
  trl_fp32: the same SFTTrainer forced to the engine's computation (fp32, no activation checkpointing): a
            like-for-like diagnostic that separates TRL's defaults from its per-step overhead; no target;
  plain:    model(input_ids, labels=input_ids).loss.backward(); AdamW step; zero_grad.
Each variant runs in its own fresh process, one after the other, `--rounds` times alternating; a run's
throughput is 4096 tokens over its median step time after `--warmup` steps (start-up, model loading and
data preparation excluded), and the reported figure is the median over rounds. Prints tokens/s, the ratios
and the machine load; writes bench/results/sft_throughput-*.json.
Exits 1 when engine < 1.5x trl or engine < 0.8x plain.
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

from bench.common import (REPO, SMALL_LLAMA, build_llama, count_llama_parameters, machine_load, median,  # noqa: E402
                          synthetic_rows, versions, write_results, write_text_jsonl)

BATCH, SEQ_LEN, LR = 16, 256, 1e-4
VARIANTS = ("engine", "trl", "trl_fp32", "plain")
TARGETS = {"trl": 1.5, "plain": 0.8}  # engine tokens/s must reach this multiple of each
ROW_MARK = "SFT_BENCH_RESULT "


# ---- workers: each runs in its own process and prints one JSON line -------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_engine(work: Path, steps: int, threads: int) -> dict:
    import yaml

    from distributed_ft.train import TrainingRun

    _set_threads(threads)
    stamps: list[float] = []
    config = {
        "model": {"name_or_path": str(work / "model")},
        "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": SEQ_LEN,
                 "loss_on": "all"},
        "strategy": {"name": "full"},
        "training": {"max_steps": steps, "micro_batch_size": BATCH, "learning_rate": LR, "optimizer": "adamw",
                     "lr_scheduler": "constant", "warmup_steps": 0},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "eval": {"enabled": False},
        "output": {"dir": str(work / "engine-run"), "overwrite": True},
    }
    (work / "engine.yaml").write_text(yaml.safe_dump(config))
    run = TrainingRun(str(work / "engine.yaml")).build()
    lengths = {len(ex["input_ids"]) for ex in run.data.train}
    if lengths != {SEQ_LEN}:
        raise SystemExit(f"engine rows are not all {SEQ_LEN} tokens: lengths {sorted(lengths)[:5]}")
    run.prepare()
    engine_on_step = run.trainer.on_step

    def on_step(step, model):  # the time each step ended, after everything the engine does per step
        if engine_on_step is not None:
            engine_on_step(step, model)
        stamps.append(time.perf_counter())

    run.trainer.on_step = on_step
    start = time.perf_counter()
    try:
        result = run.train()
    finally:
        run.close()
    return {"start": start, "stamps": stamps, "tokens_per_step": BATCH * SEQ_LEN,
            "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def run_trl(work: Path, steps: int, threads: int, fp32: bool = False) -> dict:
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
    args = SFTConfig(output_dir=str(work / "trl-run"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                     weight_decay=0.0, max_grad_norm=1.0, max_length=SEQ_LEN, packing=False, use_cpu=True,
                     # SFTConfig's defaults are bf16 autocast and activation checkpointing; trl_fp32 turns
                     # them off to run the engine's computation.
                     **({"bf16": False, "fp16": False, "activation_checkpointing": False} if fp32 else {}),
                     logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to=[],
                     disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer, callbacks=[Stamp()])
    lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    if lengths != {SEQ_LEN}:
        raise SystemExit(f"TRL rows are not all {SEQ_LEN} tokens: lengths {sorted(lengths)[:5]}")
    start = time.perf_counter()
    out = trainer.train()
    # TRL counts the tokens it trained on; they must equal the engine's.
    if trainer._total_train_tokens != steps * BATCH * SEQ_LEN:
        raise SystemExit(f"TRL trained {trainer._total_train_tokens} tokens, expected {steps * BATCH * SEQ_LEN}")
    return {"start": start, "stamps": stamps, "tokens_per_step": BATCH * SEQ_LEN, "train_loss": out.training_loss}


def run_plain(work: Path, steps: int, threads: int) -> dict:
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
        batch = rows[torch.randint(len(rows), (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "tokens_per_step": BATCH * SEQ_LEN,
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_trl_fp32(work: Path, steps: int, threads: int) -> dict:
    return run_trl(work, steps, threads, fp32=True)


WORKERS = {"engine": run_engine, "trl": run_trl, "plain": run_plain, "trl_fp32": run_trl_fp32}


# ---- orchestration ------------------------------------------------------------------------------------------

def steady_state(result: dict, warmup: int) -> dict:
    """Tokens/s over the steps after `warmup`: from the median step time, and from the mean for reference."""
    stamps = [result["start"]] + result["stamps"]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    if not intervals:
        raise SystemExit("no steps left after warm-up; raise --steps")
    tokens = result["tokens_per_step"]
    return {"steps_timed": len(intervals), "median_step_s": median(intervals),
            "tokens_per_s": tokens / median(intervals), "tokens_per_s_mean": tokens * len(intervals) / sum(intervals)}


def launch_worker(variant: str, work: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(key, None)  # one plain process, whatever the calling shell holds
    cmd = [sys.executable, __file__, "--worker", variant, "--work", str(work),
           "--steps", str(args.warmup + args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(ROW_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {variant} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(ROW_MARK):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per run")
    parser.add_argument("--rows", type=int, default=256, help="distinct training rows")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args.work, args.steps, args.threads)
        print(ROW_MARK + json.dumps(result), flush=True)
        return 0

    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="dft-sft-bench-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=SEQ_LEN * 2, **SMALL_LLAMA)
        rows = synthetic_rows(args.rows, SEQ_LEN, SMALL_LLAMA["vocab_size"])
        (work / "rows.json").write_text(json.dumps(rows))
        write_text_jsonl(work / "train.jsonl", rows)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # alternate so drift in load hits all alike
            for variant in order:
                measured = steady_state(launch_worker(variant, work, args), args.warmup)
                runs[variant].append(measured)
                print(f"round {r + 1} {variant:>8}: {measured['tokens_per_s']:9.0f} tokens/s "
                      f"(median step {measured['median_step_s'] * 1000:.0f} ms)", flush=True)
    load_after = machine_load()

    tps = {v: median([m["tokens_per_s"] for m in measured]) for v, measured in runs.items()}
    ratios = {f"engine/{v}": tps["engine"] / tps[v] for v in tps if v != "engine"}
    ok = {f"engine/{v}": ratios[f"engine/{v}"] >= target for v, target in TARGETS.items()}
    params = count_llama_parameters(**SMALL_LLAMA)
    print(f"\nmodel {params / 1e6:.2f}M parameters fp32, batch {BATCH} x {SEQ_LEN} tokens, AdamW, "
          f"{args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, median of {args.rounds}")
    for v in tps:
        print(f"  {v:>8}: {tps[v]:9.0f} tokens/s")
    for v, target in TARGETS.items():
        name = f"engine/{v}"
        print(f"  {name:>12}: {ratios[name]:.2f}x  (target >= {target}x: {'ok' if ok[name] else 'MISSED'})")
    print(f"  engine/trl_fp32: {ratios['engine/trl_fp32']:.2f}x  (TRL forced to fp32 without activation "
          f"checkpointing: like for like, no target)")
    print(f"  load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("sft_throughput", {
        "model": {**SMALL_LLAMA, "parameters": params, "dtype": "fp32"},
        "batch_size": BATCH, "seq_len": SEQ_LEN, "threads": args.threads, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "tokens_per_s": tps, "ratios": ratios,
        "targets": TARGETS, "targets_met": ok, "runs": runs, "load_before": load_before,
        "load_after": load_after, "versions": versions()})
    print(f"  results: {path.relative_to(REPO)}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
