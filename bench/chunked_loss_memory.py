"""Peak memory of a training step with the causal-LM loss or DPO's log-probs over whole-batch logits (plain) and
in chunks.

    python bench/chunked_loss_memory.py [--jobs sft,dpo] [--vocabs 32000,128000,152064] [--micro-batch 4]
                                        [--seq-len 512]
    python bench/chunked_loss_memory.py --smoke      # one small vocabulary, 2 steps; the target not checked

For each vocabulary size builds a randomly initialised fp32 Llama (hidden 256, 4 layers, untied embeddings),
then trains it with full fine-tuning, one process, one OpenMP thread, with training.loss_chunk_tokens=null
(plain) and with its default (chunked), each in its own process, for each job:
  sft: SFTRun (the code path of `dft train`): micro-batch rows of seq-len tokens, loss on every token;
  dpo: DPORun (the code path of `dft dpo`): micro-batch / 2 pairs, so as many sequences, each a prompt of
       seq-len/4..seq-len/2 words and chosen / rejected completions of as many tokens, sigmoid loss, a live
       frozen reference (a second copy of the weights, scored every step), log-probs on the completions.
The worker resets the kernel's peak-RSS mark (/proc/self/clear_refs) after step 1, when AdamW's state exists,
and reads it (VmHWM) after the last step: the peak of steps 2.. above the RSS they started from is the step's
own memory (activations, logits, gradients), which is what the logits path changes. Also reported: the process
peak RSS, and the median step time. Writes bench/results/chunked_loss_memory-*.json; `ratios` holds, per job,
chunked / plain of the step peak per vocabulary. Exits 1 unless chunked cuts the step peak at vocabulary
128000 by at least 30% (ratio <= 0.7) for every job measured there, or when a run was not sane (fewer steps,
a non-finite loss, the path not the one asked for). --smoke: vocabulary 8000, hidden 64, micro batch 2 x 64
tokens, 2 steps, every job and variant at once.
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
from bench.dpo_step import make_pairs, write_jsonl  # noqa: E402

ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4)
SMOKE_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
VARIANTS = {"plain": None, "chunked": "default"}  # training.loss_chunk_tokens (default: the config's own)
JOBS = ("sft", "dpo")
# the run log's line naming the logits path each job took (engine/chunked_loss.py)
PATH_LINE = {"sft": "loss: ", "dpo": "dpo log-probs: "}
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


# ---- the worker: one job, one variant, one vocabulary, in its own process ------------------------------------

class StepMarks:
    """Called at the end of every step: its time; after step 1 (AdamW's state now exists, from here on only the
    step's own memory comes and goes) the peak mark is reset and the RSS noted."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rss_start = None

    def __call__(self, step: int) -> None:
        self.times.append(time.perf_counter())
        if step == 1:
            reset_peak()
            self.rss_start = current_rss_bytes()


def prepared_sft(config_path: str, marks: StepMarks):
    from distributed_ft.recipes.sft import SFTRun

    run = SFTRun(config_path).build().prepare()
    run.trainer.on_step = marks
    return run


def prepared_dpo(config_path: str, marks: StepMarks):
    from distributed_ft.recipes.dpo import DPORun

    run = DPORun(config_path).build().prepare()
    inner = run.loop._step  # the pair loop has no step callback: each of its optimizer steps is one _step call

    def step(global_idx):
        out = inner(global_idx)
        marks(len(marks.times) + 1)
        return out

    run.loop._step = step
    return run


PREPARED = {"sft": prepared_sft, "dpo": prepared_dpo}


def worker(job: str, config_path: str) -> dict:
    paths: list[str] = []
    logging.getLogger("distributed_ft").addHandler(_Recorder(paths))
    marks = StepMarks()
    run = PREPARED[job](config_path, marks)
    started = time.perf_counter()
    result = run.train()
    times = [started, *marks.times]
    out = {"losses": result.losses, "steps": result.step, "step_peak": step_peak_bytes(),
           "rss_before_steps": marks.rss_start, "process_peak": peak_rss_bytes(),
           "step_s": [b - a for a, b in zip(times, times[1:])], "loss_path": paths}
    run.close()
    return out


class _Recorder(logging.Handler):
    """Keeps the run log's lines naming a logits path (`loss: ...`, `dpo log-probs: ...`)."""

    def __init__(self, into: list) -> None:
        super().__init__()
        self.into = into

    def emit(self, record) -> None:
        message = record.getMessage()
        if re.match(r"(loss|dpo log-probs|dpo reference log-probs): ", message):
            self.into.append(message)


# ---- orchestration ------------------------------------------------------------------------------------------

def job_sections(job: str, vocab: int, work: Path, args) -> dict:
    """The config sections one job's runs differ in: data (or pairs), batch, and the objective."""
    if job == "sft":
        return {"data": {"train": [{"path": str(work / f"train-{vocab}.jsonl"), "format": "text"}],
                         "max_length": args.seq_len, "loss_on": "all", "validation_fraction": 0.0},
                "micro_batch_size": args.micro_batch}
    return {"pairs": {"train": [{"path": str(work / f"pairs-{vocab}.jsonl")}],
                      "validation": [{"path": str(work / f"held-{vocab}.jsonl")}],  # nothing split off train
                      "max_length": args.seq_len, "max_prompt_length": args.seq_len // 2},
            "dpo": {"loss": "sigmoid", "beta": 0.1, "reference": "live"}, "micro_batch_size": dpo_pairs(args)}


def dpo_pairs(args) -> int:
    return max(1, args.micro_batch // 2)  # two sequences a pair: as many rows as an SFT micro-batch


def write_data(work: Path, vocab: int, args) -> None:
    write_text_jsonl(work / f"train-{vocab}.jsonl", synthetic_rows(args.micro_batch * args.steps, args.seq_len, vocab))
    half = args.seq_len // 2
    pairs = make_pairs(dpo_pairs(args) * args.steps + 2, half, half, vocab)
    write_jsonl(work / f"pairs-{vocab}.jsonl", pairs[:-2])
    write_jsonl(work / f"held-{vocab}.jsonl", pairs[-2:])


def run_variant(job: str, variant: str, vocab: int, work: Path, args) -> dict:
    sections = job_sections(job, vocab, work, args)
    training = {"max_steps": args.steps, "micro_batch_size": sections.pop("micro_batch_size"),
                "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0,
                "mixed_precision": "no"}
    if VARIANTS[variant] is None:
        training["loss_chunk_tokens"] = None
    config = {"model": {"name_or_path": str(work / f"model-{vocab}")}, **sections,
              "strategy": {"name": "full"}, "training": training,
              "logging": {"log_every": 10 ** 6, "progress_bar": False}, "eval": {"enabled": False},
              "output": {"dir": str(work / f"run-{job}-{variant}-{vocab}"), "overwrite": True}}
    import yaml

    path = work / f"{job}-{variant}-{vocab}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    row = run_worker([sys.executable, __file__, "--worker", str(path), "--jobs", job], env, args.timeout,
                     f"{job} {variant} vocab {vocab}", MARK)
    row["wall_s"] = time.perf_counter() - started
    return row


def check(sanity: Sanity, job: str, variant: str, vocab: int, row: dict, steps: int) -> None:
    name = f"{job} {variant} vocab {vocab}"
    sanity.check(row["steps"] == steps, f"{name}: {row['steps']} steps ran, expected {steps}")
    sanity.all_finite(f"{name}: losses", row["losses"])
    sanity.finite(f"{name}: step peak above its start", row["step_peak"] - row["rss_before_steps"], positive=True)
    wanted = "full-vocabulary logits" if variant == "plain" else "chunked"
    sanity.check(any(line.startswith(PATH_LINE[job]) and wanted in line for line in row["loss_path"]),
                 f"{name}: logits path {row['loss_path']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs: sft, dpo")
    parser.add_argument("--vocabs", default="32000,128000,152064", help="comma-separated vocabulary sizes")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step (dpo: half as many pairs)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the peak is over 2..)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    jobs = [j for j in re.split(r"[,\s]+", args.jobs.strip()) if j]
    if args.worker:
        print(MARK + json.dumps(worker(jobs[0], args.worker)), flush=True)
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 allocates the optimizer state)")
    if set(jobs) - set(JOBS):
        parser.error(f"unknown jobs {sorted(set(jobs) - set(JOBS))} (valid: {', '.join(JOBS)})")

    vocabs = [int(v) for v in re.split(r"[,\s]+", args.vocabs.strip()) if v]
    arch = SMOKE_ARCH if args.smoke else ARCH
    sanity = Sanity()
    load_before = machine_load()
    results: dict[str, dict[str, dict]] = {job: {} for job in jobs}
    with tempfile.TemporaryDirectory(prefix="dft-chunked-bench-") as tmp:
        work = Path(tmp)
        for vocab in vocabs:
            build_llama(work / f"model-{vocab}", max_position_embeddings=max(64, args.seq_len), vocab_size=vocab,
                        **arch)
            write_data(work, vocab, args)
            runs = [(job, variant) for job in jobs for variant in VARIANTS]
            if args.smoke:  # every run at once: a smoke run's figures say nothing, its time matters
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(runs)) as pool:
                    rows = dict(zip(runs, pool.map(lambda r: run_variant(*r, vocab, work, args), runs)))
            else:
                rows = {(job, variant): run_variant(job, variant, vocab, work, args) for job, variant in runs}
            for (job, variant), row in rows.items():
                check(sanity, job, variant, vocab, row, args.steps)
                print(f"{job} vocab {vocab} {variant}: done in {row['wall_s']:.0f} s", flush=True)
                results[job].setdefault(str(vocab), {})[variant] = row
    load_after = machine_load()

    tokens = args.micro_batch * args.seq_len
    print(f"\n{'SMOKE RUN (tiny sizes, target not checked): ' if args.smoke else ''}Llama hidden "
          f"{arch['hidden_size']}, {arch['num_hidden_layers']} layers, fp32, AdamW, one process, 1 thread; sft: "
          f"{args.micro_batch} x {args.seq_len} = {tokens} tokens per step; dpo: {dpo_pairs(args)} pairs of at most "
          f"{args.seq_len} tokens a side, a frozen reference")
    print(f"{'job':>4} {'vocab':>7} {'params':>7} {'logits':>7} {'variant':>8} {'step peak':>10} "
          f"{'process peak':>12} {'step s':>7}")
    ratios: dict[str, dict] = {job: {} for job in jobs}
    summary: dict[str, dict] = {job: {} for job in jobs}
    for job, per_vocab in results.items():
        for vocab, rows in per_vocab.items():
            params = count_llama_parameters(vocab_size=int(vocab), **arch)
            for variant, row in rows.items():
                row["step_peak_above_start"] = row["step_peak"] - row["rss_before_steps"]
                row["median_step_s"] = median(row["step_s"][1:])
                print(f"{job:>4} {vocab:>7} {params / 1e6:6.1f}M {tokens * int(vocab) * 4 / GiB:6.2f}G {variant:>8} "
                      f"{row['step_peak_above_start'] / GiB:9.2f}G {row['process_peak'] / GiB:11.2f}G "
                      f"{row['median_step_s']:7.2f}")
            plain, chunked = rows["plain"], rows["chunked"]
            ratios[job][vocab] = chunked["step_peak_above_start"] / plain["step_peak_above_start"]
            summary[job][vocab] = {"step_peak_ratio": ratios[job][vocab],
                                   "process_peak_ratio": chunked["process_peak"] / plain["process_peak"],
                                   "step_time_ratio": chunked["median_step_s"] / plain["median_step_s"]}
            print(f"{job:>4} {vocab:>7} chunked/plain: step peak {ratios[job][vocab]:.2f}x, process peak "
                  f"{summary[job][vocab]['process_peak_ratio']:.2f}x, step time "
                  f"{summary[job][vocab]['step_time_ratio']:.2f}x")
    checked = {job: r[str(TARGET_VOCAB)] for job, r in ratios.items() if str(TARGET_VOCAB) in r}
    ok = all(ratio <= TARGET_RATIO for ratio in checked.values())
    if checked:
        verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok else "MISSED")
        print(f"chunked step peak <= {TARGET_RATIO}x plain at vocabulary {TARGET_VOCAB} "
              f"({', '.join(checked)}): {verdict}")
    elif not args.smoke:
        print(f"vocabulary {TARGET_VOCAB} not measured: the target is not checked")
    print(f"load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("chunked_loss_memory", {
        "model": {**arch, "dtype": "fp32"}, "jobs": jobs, "micro_batch": args.micro_batch,
        "dpo_pairs": dpo_pairs(args), "seq_len": args.seq_len, "steps": args.steps, "ratios": ratios,
        "summary": summary, "runs": results, "target": {"vocab": TARGET_VOCAB, "max_ratio": TARGET_RATIO},
        "load_before": load_before, "load_after": load_after, "sanity_failures": sanity.failures,
        "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(REPO)}")
    return exit_status(sanity, ok, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
