"""`dft plan`'s predicted peak memory against the peak measured in training steps, lever by lever, on CPU.

    python bench/plan_memory.py [--steps 2] [--micro-batch 2] [--seq-len 256] [--levers full,lora,...] [--jobs 2]
    python bench/plan_memory.py --smoke      # every lever on a 0.15M-parameter Llama; the 25% bound not checked

Builds a randomly initialised fp32 Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000: 134M
parameters, 85M of them in the blocks' linear layers), then trains `--steps` steps of micro-batch 2 x 256 tokens
through SFTRun (the code path of `dft train`: one process, fp32, AdamW, one OpenMP thread) under each lever, each
in a process of its own (--per-process N: N levers one after the other in one process):
  full                        full fine-tuning, whole-batch logits (training.loss_chunk_tokens: null)
  lora                        LoRA r=16 on every linear layer, whole-batch logits
  lora_chunked                the same with the chunked loss, 128 tokens a chunk (4 chunks a micro-batch)
  lora_checkpointing          LoRA with activation checkpointing (model.gradient_checkpointing), whole-batch logits
  lora_checkpointing_chunked  both
  qlora                       LoRA over a 4-bit NF4 base (model.load_in_4bit, double quantization), chunked loss
  qlora_checkpointing         the same with activation checkpointing
and compares, per lever, what the plan predicts for that run config (`plan_for_run_config`, 1 GPU, ZeRO-0, its
optimizer step, where it is not the fused kernel, taken one tensor at a time as torch does on CPU) with what was measured:
  weights     the bytes of the built model's tensors (parameters, buffers, 4-bit block constants; each storage
              once) against the plan's `params`;
  step peak   the highest tensor memory the training steps allocated above what existed when they started (the
              weights), against the plan's peak minus its `params`. Measured by PyTorch's own CPU allocator
              accounting: torch.profiler with profile_memory records every allocation and free of c10's CPU
              allocator, and the running sum of those since the steps began is the live tensor memory, the CPU
              counterpart of torch.cuda.max_memory_allocated. It is split into the forward/backward phase and the
              optimizer step (inside `Optimizer.step`), each next to the plan's figure for it;
  total       weights + step peak, against the plan's per-GPU peak.
Not compared, as a GPU plan does not hold them: the Python process, libraries, the data and the allocator's own
slack. For reference each lever also reports the peak RSS of the steps above the RSS they started from
(VmHWM after /proc/self/clear_refs, glibc returning large blocks at once), which includes those, and the pages
of the weights the steps touch first (from_pretrained maps the safetensors file).
Writes bench/results/plan_memory-*.json with predicted, measured and their ratio per lever. Exits 1 when a
lever's total or step-peak ratio is off by more than 25% (outside 0.75..1.25), or a run was not sane (fewer
steps, a non-finite loss, not the loss path or 4-bit base asked for). --smoke: a 0.15M-parameter Llama, micro
batch 2 x 32 tokens, loss chunks of 8 tokens, 2 steps, the levers in two processes of four and three (process
start-up is most of a smoke run's time); the 25% bound is not checked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LLAMA_100M, REPO, TINY_LLAMA, Sanity, build_llama, current_rss_bytes,  # noqa: E402
                          exit_status, machine_load, parse_args, run_worker, synthetic_rows, versions, write_results,
                          write_text_jsonl)

MARK = "PLAN_MEMORY_BENCH "
BOUND = 0.25  # |predicted / measured - 1| allowed for each lever's total and step peak
MB = 1e6
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
# lever -> (strategy, model section extras, whether the loss is chunked)
LEVERS = {
    "full": ({"name": "full"}, {}, False),
    "lora": (LORA, {}, False),
    "lora_chunked": (LORA, {}, True),
    "lora_checkpointing": (LORA, {"gradient_checkpointing": True}, False),
    "lora_checkpointing_chunked": (LORA, {"gradient_checkpointing": True}, True),
    "qlora": (LORA, {"load_in_4bit": True}, True),
    "qlora_checkpointing": (LORA, {"load_in_4bit": True, "gradient_checkpointing": True}, True),
}
SMOKE = {"micro_batch": 2, "seq_len": 32, "chunk_tokens": 8, "steps": 2, "jobs": 2, "per_process": 4}


# ---- the worker: levers one after the other in one process ---------------------------------------------

def tensor_bytes(model) -> int:
    """Bytes of the model's tensors: parameters, buffers and bitsandbytes' quantization constants, each storage
    counted once."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for param in model.parameters():
        add(param)
        state = getattr(param, "quant_state", None)
        while state is not None:  # the block constants, and under double quantization their own constants
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    for buffer in model.buffers():
        add(buffer)
    return total


def allocator_peaks(prof) -> dict:
    """Peaks of the live CPU tensor memory allocated since profiling began: overall, outside the optimizer
    steps (forward/backward) and inside them."""
    import torch

    events = list(prof.profiler.kineto_results.events())
    steps = [(e.start_ns(), e.end_ns()) for e in events if e.name().startswith("Optimizer.step#")]
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = forward_backward = step = 0
    for event in memory:
        live += event.nbytes()
        if any(start <= event.start_ns() <= end for start, end in steps):
            step = max(step, live)
        else:
            forward_backward = max(forward_backward, live)
    return {"step_peak": max(forward_backward, step), "forward_backward": forward_backward, "optimizer_step": step,
            "optimizer_steps_seen": len(steps), "memory_events": len(memory)}


def worker(config_path: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from distributed_ft.recipes.sft import SFTRun

    run = SFTRun(config_path).build()
    weights = tensor_bytes(run.model)
    quantized_layers = sum(type(m).__name__ == "Linear4bit" for m in run.model.modules())
    run.prepare()
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark restarts at the current RSS
    rss_start = current_rss_bytes()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run.train()
    wall = time.perf_counter() - started
    out = {"weights": weights, **allocator_peaks(prof), "rss_step_peak": _peak_rss() - rss_start,
           "losses": result.losses, "steps": result.step, "train_s": wall,
           "chunked_loss": run.trainer.chunked_loss is not None,  # the loss path the trainer took
           "linear4bit_layers": quantized_layers}
    run.close()
    return out


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


# ---- orchestration ------------------------------------------------------------------------------------------

def write_config(lever: str, work: Path, args) -> Path:
    import yaml

    strategy, model_extra, chunked = LEVERS[lever]
    config = {"model": {"name_or_path": str(work / "model"), **model_extra},
              "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": args.seq_len,
                       "loss_on": "all", "validation_fraction": 0.0},
              "strategy": strategy,
              "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "learning_rate": 1e-4,
                           "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0,
                           "mixed_precision": "no",  # fp32 compute, whatever the CPU's bf16 support
                           "loss_chunk_tokens": args.chunk_tokens if chunked else None},
              "logging": {"log_every": 10 ** 6, "progress_bar": False}, "eval": {"enabled": False},
              "output": {"dir": str(work / f"run-{lever}"), "overwrite": True}}
    path = work / f"{lever}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def predict(config_path: Path) -> dict:
    """What the plan says for this run on one GPU without sharding (its optimizer stepped one tensor at a time,
    as on CPU)."""
    from distributed_ft.cluster.plan import plan_for_run_config
    from distributed_ft.config import load_config

    row = plan_for_run_config(load_config(config_path), gpus=1, per_tensor_optimizer=True).rows[0]
    weights = row.states.params
    return {"weights": weights, "step_peak": row.gpu_total - weights, "total": row.gpu_total,
            "forward_backward": row.forward_backward - weights, "optimizer_step": row.optimizer_step - weights,
            "activations": row.activations.peak, "grads": row.states.grads, "optimizer": row.states.optimizer,
            "step_temporaries": row.step_temporaries}


def run_levers(levers: list[str], work: Path, args) -> dict:
    """Measure `levers` one after the other in one worker process, then predict each."""
    paths = [write_config(lever, work, args) for lever in levers]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           # large blocks straight back to the OS, so the RSS reference follows the live tensors
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(key, None)  # one plain process, whatever the calling shell holds
    started = time.perf_counter()
    runs = run_worker([sys.executable, __file__, "--worker", ",".join(map(str, paths))], env,
                      args.timeout * len(levers), "+".join(levers), MARK)
    wall = time.perf_counter() - started
    rows = {}
    for lever, path, measured in zip(levers, paths, runs):
        measured["total"] = measured["weights"] + measured["step_peak"]
        predicted = predict(path)
        ratio = {key: predicted[key] / measured[key] if measured[key] else float("inf")
                 for key in ("weights", "step_peak", "total", "forward_backward", "optimizer_step")}
        rows[lever] = {"predicted": predicted, "measured": measured, "ratio": ratio, "process_wall_s": wall,
                       "levers_in_process": levers}
    return rows


def check(sanity: Sanity, lever: str, row: dict, steps: int) -> None:
    measured = row["measured"]
    sanity.check(measured["steps"] == steps, f"{lever}: {measured['steps']} steps ran, expected {steps}")
    sanity.all_finite(f"{lever}: losses", measured["losses"])
    sanity.finite(f"{lever}: step peak", measured["step_peak"], positive=True)
    sanity.check(measured["optimizer_steps_seen"] == steps,
                 f"{lever}: {measured['optimizer_steps_seen']} optimizer steps profiled, expected {steps}")
    chunked = LEVERS[lever][2]
    sanity.check(measured["chunked_loss"] == chunked, f"{lever}: chunked loss {measured['chunked_loss']}, "
                                                      f"asked {chunked}")
    quantized = bool(LEVERS[lever][1].get("load_in_4bit"))
    sanity.check((measured["linear4bit_layers"] > 0) == quantized,
                 f"{lever}: {measured['linear4bit_layers']} Linear4bit layers (4-bit base asked: {quantized})")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated levers (see the docstring)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=128, help="training.loss_chunk_tokens of chunked levers")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (step 2 runs with Adam's state)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once")
    parser.add_argument("--per-process", type=int, default=1,
                        help="levers measured one after the other in one worker process (the smoke run: 4)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.worker:
        print(MARK + json.dumps([worker(path) for path in args.worker.split(",")]), flush=True)
        return 0
    levers = [name for name in re.split(r"[,\s]+", args.levers.strip()) if name]
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        parser.error(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 allocates the optimizer state)")

    arch = TINY_LLAMA if args.smoke else LLAMA_100M
    sanity = Sanity()
    load_before = machine_load()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dft-plan-memory-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=max(64, args.seq_len), **arch)
        write_text_jsonl(work / "train.jsonl", synthetic_rows(args.micro_batch * args.steps, args.seq_len,
                                                              arch["vocab_size"]))
        size = max(1, args.per_process)
        groups = [levers[i:i + size] for i in range(0, len(levers), size)]
        rows = {}
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for group_rows in pool.map(lambda group: run_levers(group, work, args), groups):
                rows.update(group_rows)
    for lever, row in rows.items():
        check(sanity, lever, row, args.steps)
    load_after = machine_load()

    print(f"\n{'SMOKE RUN (tiny sizes, bound not checked): ' if args.smoke else ''}Llama hidden {arch['hidden_size']}, "
          f"{arch['num_hidden_layers']} layers, vocab {arch['vocab_size']}, fp32, AdamW, one process, "
          f"{args.micro_batch} x {args.seq_len} tokens a step, chunked levers {args.chunk_tokens} tokens a chunk; "
          f"{cpu_model()}")
    print(f"{'lever':<28}{'weights MB':>22}{'step peak MB':>22}{'total MB':>28}{'RSS peak MB':>13}")
    print(f"{'':<28}{'plan / measured':>22}{'plan / measured':>22}{'plan / measured (ratio)':>28}")
    off = []
    for lever, row in rows.items():
        p, m, r = row["predicted"], row["measured"], row["ratio"]
        print(f"{lever:<28}{p['weights'] / MB:>10.1f} / {m['weights'] / MB:<9.1f}"
              f"{p['step_peak'] / MB:>10.1f} / {m['step_peak'] / MB:<9.1f}"
              f"{p['total'] / MB:>14.1f} / {m['total'] / MB:.1f} ({r['total']:.2f}){m['rss_step_peak'] / MB:>13.1f}")
        off += [f"{lever} {key} {r[key]:.2f}" for key in ("total", "step_peak") if abs(r[key] - 1) > BOUND]
    ok = not off
    verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok else "MISSED: " + ", ".join(off))
    print(f"every lever's total and step peak within {BOUND:.0%} of the measured: {verdict}")
    print(f"load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus; {time.perf_counter() - started:.0f} s")
    path = write_results("plan_memory", {
        "model": {**arch, "dtype": "fp32"}, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "chunk_tokens": args.chunk_tokens, "steps": args.steps, "bound": BOUND, "cpu": cpu_model(),
        "measurement": "torch.profiler profile_memory: c10 CPU allocator bytes live since the steps began; "
                       "weights by tensor accounting", "levers": rows, "off_by_more_than_bound": off,
        "load_before": load_before, "load_after": load_after, "sanity_failures": sanity.failures,
        "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(REPO)}")
    return exit_status(sanity, ok, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
