"""Peak memory of a training step with the causal-LM loss over whole-batch logits (plain) and in chunks.

    python bench/chunked_loss_memory.py [--vocabs 32000,128000,152064] [--micro-batch 4] [--seq-len 512]
    python bench/chunked_loss_memory.py --smoke      # one small vocabulary, 2 steps; the target not checked

For each vocabulary size builds a randomly initialised fp32 Llama (hidden 256, 4 layers, untied embeddings),
then runs full fine-tuning through SFTRun (the code path of `dft train`, one process, one OpenMP thread) with
training.loss_chunk_tokens=null (plain) and with its default (chunked), each in its own process. The worker
resets the kernel's peak-RSS mark (/proc/self/clear_refs) after step 1, when AdamW's state exists, and reads
it (VmHWM) after the last step: the peak of steps 2.. above the RSS they started from is the step's own
memory (activations, logits, gradients), which is what the loss path changes. Also reported: the process
peak RSS, and the median step time. Writes bench/results/chunked_loss_memory-*.json; `ratios` holds chunked /
plain of the step peak per vocabulary. Exits 1 unless chunked cuts the step peak at vocabulary 128000 by at
least 30% (ratio <= 0.7), or when a run was not sane (fewer steps, a non-finite loss, the path not the one
asked for). --smoke: vocabulary 8000, hidden 64, micro batch 2 x 64 tokens, 2 steps, both variants at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (REPO, Sanity, build_llama, count_llama_parameters, current_rss_bytes,  # noqa: E402
                          exit_status, machine_load, median, parse_args, peak_rss_bytes, run_worker, synthetic_rows,
                          versions, write_results, write_text_jsonl)

ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4)
SMOKE_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
VARIANTS = {"plain": None, "chunked": "default"}  # training.loss_chunk_tokens (default: the config's own)
TARGET_VOCAB, TARGET_RATIO = 128000, 0.7
SMOKE = {"vocabs": "8000", "micro_batch": 2, "seq_len": 64, "steps": 2}
MARK = "CHUNKED_LOSS_BENCH "
GiB = 1024 ** 3


def step_peak_bytes() -> int:
    """The peak RSS since the last reset of the mark (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark restarts at the current RSS


# ---- the worker: one variant, one vocabulary, in its own process ---------------------------------------------

def worker(config_path: str) -> dict:
    from distributed_ft.recipes.sft import SFTRun

    run = SFTRun(config_path).build()
    paths = []
    logging.getLogger("distributed_ft").addHandler(_Recorder(paths))
    run.prepare()
    marks: dict = {}

    def on_step(step: int) -> None:
        marks.setdefault("times", []).append(time.perf_counter())
        if step == 1:  # AdamW's state now exists: from here on only the step's own memory comes and goes
            reset_peak()
            marks["rss_start"] = current_rss_bytes()

    run.trainer.on_step = on_step
    started = time.perf_counter()
    result = run.train()
    times = [started, *marks["times"]]
    out = {"losses": result.losses, "steps": result.step, "step_peak": step_peak_bytes(),
           "rss_before_steps": marks["rss_start"], "process_peak": peak_rss_bytes(),
           "step_s": [b - a for a, b in zip(times, times[1:])], "loss_path": paths}
    run.close()
    return out


class _Recorder(logging.Handler):
    """Keeps the run log's `loss:` lines (which loss path the trainer took)."""

    def __init__(self, into: list) -> None:
        super().__init__()
        self.into = into

    def emit(self, record) -> None:
        if record.getMessage().startswith("loss:"):
            self.into.append(record.getMessage())


# ---- orchestration ------------------------------------------------------------------------------------------

def run_variant(variant: str, vocab: int, work: Path, args) -> dict:
    training = {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "learning_rate": 1e-4,
                "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0}
    if VARIANTS[variant] is None:
        training["loss_chunk_tokens"] = None
    config = {"model": {"name_or_path": str(work / f"model-{vocab}")},
              "data": {"train": [{"path": str(work / f"train-{vocab}.jsonl"), "format": "text"}],
                       "max_length": args.seq_len, "loss_on": "all", "validation_fraction": 0.0},
              "strategy": {"name": "full"}, "training": training,
              "logging": {"log_every": 10 ** 6, "progress_bar": False}, "eval": {"enabled": False},
              "output": {"dir": str(work / f"run-{variant}-{vocab}"), "overwrite": True}}
    import yaml

    path = work / f"{variant}-{vocab}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    row = run_worker([sys.executable, __file__, "--worker", str(path)], env, args.timeout,
                     f"{variant} vocab {vocab}", MARK)
    row["wall_s"] = time.perf_counter() - started
    return row


def check(sanity: Sanity, variant: str, vocab: int, row: dict, steps: int) -> None:
    name = f"{variant} vocab {vocab}"
    sanity.check(row["steps"] == steps, f"{name}: {row['steps']} steps ran, expected {steps}")
    sanity.all_finite(f"{name}: losses", row["losses"])
    sanity.finite(f"{name}: step peak above its start", row["step_peak"] - row["rss_before_steps"], positive=True)
    wanted = "full-vocabulary logits" if variant == "plain" else "chunked cross-entropy"
    sanity.check(any(wanted in line for line in row["loss_path"]), f"{name}: loss path {row['loss_path']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="32000,128000,152064", help="comma-separated vocabulary sizes")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the peak is over 2..)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        print(MARK + json.dumps(worker(args.worker)), flush=True)
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 allocates the optimizer state)")

    vocabs = [int(v) for v in re.split(r"[,\s]+", args.vocabs.strip()) if v]
    arch = SMOKE_ARCH if args.smoke else ARCH
    sanity = Sanity()
    load_before = machine_load()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dft-chunked-bench-") as tmp:
        work = Path(tmp)
        for vocab in vocabs:
            build_llama(work / f"model-{vocab}", max_position_embeddings=max(64, args.seq_len), vocab_size=vocab,
                        **arch)
            write_text_jsonl(work / f"train-{vocab}.jsonl", synthetic_rows(args.micro_batch * args.steps,
                                                                            args.seq_len, vocab))
            if args.smoke:  # both variants at once: a smoke run's figures say nothing, its time matters
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(VARIANTS)) as pool:
                    rows = dict(zip(VARIANTS, pool.map(lambda v: run_variant(v, vocab, work, args), VARIANTS)))
            else:
                rows = {variant: run_variant(variant, vocab, work, args) for variant in VARIANTS}
            for variant, row in rows.items():
                check(sanity, variant, vocab, row, args.steps)
                print(f"vocab {vocab} {variant}: done in {row['wall_s']:.0f} s", flush=True)
            results[str(vocab)] = rows
    load_after = machine_load()

    tokens = args.micro_batch * args.seq_len
    print(f"\n{'SMOKE RUN (tiny sizes, target not checked): ' if args.smoke else ''}Llama hidden "
          f"{arch['hidden_size']}, {arch['num_hidden_layers']} layers, fp32, AdamW, one process, 1 thread, "
          f"{args.micro_batch} x {args.seq_len} = {tokens} tokens per step")
    print(f"{'vocab':>7} {'params':>7} {'logits':>7} {'variant':>8} {'step peak':>10} {'process peak':>12} "
          f"{'step s':>7}")
    ratios, summary = {}, {}
    for vocab, rows in results.items():
        params = count_llama_parameters(vocab_size=int(vocab), **arch)
        for variant, row in rows.items():
            row["step_peak_above_start"] = row["step_peak"] - row["rss_before_steps"]
            row["median_step_s"] = median(row["step_s"][1:])
            print(f"{vocab:>7} {params / 1e6:6.1f}M {tokens * int(vocab) * 4 / GiB:6.2f}G {variant:>8} "
                  f"{row['step_peak_above_start'] / GiB:9.2f}G {row['process_peak'] / GiB:11.2f}G "
                  f"{row['median_step_s']:7.2f}")
        plain, chunked = rows["plain"], rows["chunked"]
        ratios[vocab] = chunked["step_peak_above_start"] / plain["step_peak_above_start"]
        summary[vocab] = {"step_peak_ratio": ratios[vocab],
                          "process_peak_ratio": chunked["process_peak"] / plain["process_peak"],
                          "step_time_ratio": chunked["median_step_s"] / plain["median_step_s"]}
        print(f"{vocab:>7} chunked/plain: step peak {ratios[vocab]:.2f}x, process peak "
              f"{summary[vocab]['process_peak_ratio']:.2f}x, step time {summary[vocab]['step_time_ratio']:.2f}x")
    ok = True
    if str(TARGET_VOCAB) in ratios:
        ok = ratios[str(TARGET_VOCAB)] <= TARGET_RATIO
        verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok else "MISSED")
        print(f"chunked step peak <= {TARGET_RATIO}x plain at vocabulary {TARGET_VOCAB}: {verdict}")
    elif not args.smoke:
        print(f"vocabulary {TARGET_VOCAB} not measured: the target is not checked")
    print(f"load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("chunked_loss_memory", {
        "model": {**arch, "dtype": "fp32"}, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "steps": args.steps, "ratios": ratios, "summary": summary, "runs": results,
        "target": {"vocab": TARGET_VOCAB, "max_ratio": TARGET_RATIO}, "load_before": load_before,
        "load_after": load_after, "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(REPO)}")
    return exit_status(sanity, ok, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
