"""One prepared GPU check: training tokens/s, MFU and peak memory of the engine, and one PPO and one GRPO step.

    python bench/gpu_check.py               # on one GPU (H100/H200): finishes in a few minutes
    python bench/gpu_check.py --smoke       # every variant at tiny shapes on CPU, as CI runs it

Builds a randomly initialised Llama-shaped model (default: hidden 2048, 16 layers, 16 heads / 8 KV heads,
MLP 8192, vocab 128256: 1.4B parameters), rows of exactly `--seq-len` tokens (2048), and trains batch
`--batch-size` x seq-len through SFTRun (the path of `dft train`), bf16 autocast, sdpa attention:
  full: full fine-tuning, AdamW;
  lora: LoRA r=16 on every linear layer of the blocks;
then one timed PPO and one timed GRPO step (16 prompts x 4 samples of 32 tokens, after a warm-up step) on the
built-in tiny model with an exact-match string grader (no sandbox needed), the paths of `dft ppo` / `dft grpo`.
Each variant runs in its own process. Reported: tokens/s (median step after `--warmup`), peak memory
(torch.cuda.max_memory_allocated on GPU, peak resident memory on CPU), and MFU = tokens/s x
(6 x parameters + 12 x layers x hidden x seq-len) / peak, against both the card's dense bf16 peak from its
data sheet and the peak measured here (an 8192^3 bf16 matmul; on CPU an fp32 one). Targets on a GPU:
full fine-tuning MFU >= 45% of the measured peak, LoRA tokens/s >= 2.5x full. Writes
bench/results/gpu_check-*.json; exits 1 when a target is missed on a GPU or a run is not sane.
The engine needs its own dependencies on the GPU machine (pydantic, datasets, peft, ...): `pip install -e .`.
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

from bench.common import (REPO, Sanity, build_llama, count_llama_parameters, exit_status, machine_load,  # noqa: E402
                          median, parse_args, peak_rss_bytes, run_worker, synthetic_rows, versions,
                          write_results, write_text_jsonl)

ARCH = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 128256}
SMOKE_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 1000}
SMOKE = {"steps": 1, "warmup": 1, "batch_size": 2, "seq_len": 32, "timeout": 300}
# Dense bf16 tensor-core peaks from the data sheets (SXM parts), by a word of torch.cuda.get_device_name().
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGETS = {"full_mfu": 0.45, "lora/full": 2.5}
VARIANTS = ("full", "lora", "ppo", "grpo")
ROW_MARK = "GPU_CHECK_RESULT "


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_memory() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if on_gpu() else peak_rss_bytes()


def measured_peak_flops(size: int) -> float:
    """FLOP/s of a size^3 matmul: bf16 on a GPU, fp32 on CPU (what this machine's training computes in)."""
    import torch

    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if on_gpu() else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * size ** 3 * reps / (time.perf_counter() - start)


# ---- workers: each runs in its own process and prints one JSON line -------------------------------------

def run_training(work: Path, strategy: dict, args) -> dict:
    import torch
    import yaml

    from distributed_ft.recipes.sft import SFTRun

    stamps: list[float] = []
    config = {
        "model": {"name_or_path": str(work / "model"), "attn_implementation": "sdpa"},
        "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": args.seq_len,
                 "loss_on": "all"},
        "strategy": strategy,
        "training": {"max_steps": args.warmup + args.steps, "micro_batch_size": args.batch_size,
                     "learning_rate": 1e-5, "lr_scheduler": "constant",
                     "mixed_precision": "bf16" if on_gpu() else "no"},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "eval": {"enabled": False},
        "output": {"dir": str(work / f"run-{strategy['name']}"), "overwrite": True},
    }
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    run = SFTRun(str(work / "run.yaml")).build()
    run.prepare()

    def stamp(step):  # the time each step ended, its GPU work included
        if on_gpu():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    run.trainer.on_step = stamp
    start = time.perf_counter()
    try:
        result = run.train()
    finally:
        run.close()
    intervals = [b - a for a, b in zip([start] + stamps, stamps)][args.warmup:]
    step_s = median(intervals)
    return {"steps_run": len(stamps), "step_s": step_s, "tokens_per_s": args.batch_size * args.seq_len / step_s,
            "losses": result.losses, "peak_memory": peak_memory()}


def run_rl(kind: str, args) -> dict:
    """One warm-up and one timed step of `dft ppo` / `dft grpo` on the built-in tiny model."""
    from bench.rl_common import train_dft

    if kind == "ppo":
        from distributed_ft.recipes.ppo import PPORun as Run
    else:
        from distributed_ft.recipes.grpo import GRPORun as Run
    prompts, generations, new_tokens = (4, 2, 8) if args.smoke else (16, 4, 32)
    with tempfile.TemporaryDirectory(prefix=f"{kind}-gpu-check-") as out:
        overrides = [f"output.dir={out}", "training.max_steps=2", f"{kind}.rollout_batch_size={prompts}",
                     f"{kind}.num_generations={generations}", f"{kind}.max_new_tokens={new_tokens}",
                     f"{kind}.eval_prompts=0", "data.validation_fraction=0",
                     f"training.micro_batch_size={prompts * generations}", "training.gradient_accumulation_steps=1",
                     f"{kind}.ppo_epochs=1", "training.checkpoint_every=null",
                     "logging.progress_bar=false", "logging.log_every=1", f"{kind}.sample_every=1000000",
                     "grader.config=configs/ppo/grader_exact.yaml"]
        result = train_dft(Run(REPO / "configs" / kind / "quickstart.yaml", overrides).build())
    row = result.rows[-1]
    return {"steps_run": result.step, "step_s": row["time/step"],
            "split_s": {k: row[f"time/{k}"] for k in ("generation", "forward", "grading_wait", "update")},
            "samples_per_s": row["samples"] / row["time/step"], "unscorable": row["unscorable"],
            "peak_memory": peak_memory()}


def worker(variant: str, work: Path, args) -> dict:
    if variant == "full":
        return run_training(work, {"name": "full"}, args)
    if variant == "lora":
        return run_training(work, {"name": "lora", "r": 16, "alpha": 32,
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]}, args)
    return run_rl(variant, args)


# ---- orchestration ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--timeout", type=int, default=420, help="seconds allowed per variant")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    arch = SMOKE_ARCH if args.smoke else ARCH
    if args.worker:
        print(ROW_MARK + json.dumps(worker(args.worker, args.work, args)), flush=True)
        return 0
    import torch

    device = torch.cuda.get_device_name() if on_gpu() else "cpu"
    load_before = machine_load()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=args.seq_len, **arch)
        rows = synthetic_rows(args.batch_size * (args.warmup + args.steps), args.seq_len, arch["vocab_size"])
        write_text_jsonl(work / "train.jsonl", rows)
        flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                 "--seq-len", str(args.seq_len)] + (["--smoke"] if args.smoke else [])
        results = {v: run_worker([sys.executable, __file__, "--worker", v, "--work", str(work), *flags], env,
                                 args.timeout, v, ROW_MARK) for v in VARIANTS}
    parameters = count_llama_parameters(**arch)
    flops_per_token = 6 * parameters + 12 * arch["num_hidden_layers"] * arch["hidden_size"] * args.seq_len
    measured = measured_peak_flops(256 if args.smoke else 8192)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in device), None)
    full, lora = results["full"], results["lora"]
    figures = {"parameters": parameters, "flops_per_token": flops_per_token, "measured_peak_flops": measured,
               "datasheet_peak_flops": sheet,
               "full_mfu": full["tokens_per_s"] * flops_per_token / measured,
               "full_mfu_datasheet": None if sheet is None else full["tokens_per_s"] * flops_per_token / sheet}
    ratios = {"lora/full": lora["tokens_per_s"] / full["tokens_per_s"]}
    met = {"full_mfu": figures["full_mfu"] >= TARGETS["full_mfu"], "lora/full": ratios["lora/full"] >= TARGETS["lora/full"]}

    sanity = Sanity()
    for name in ("full", "lora"):
        r = results[name]
        sanity.check(r["steps_run"] == args.warmup + args.steps, f"{name}: {r['steps_run']} steps ran")
        sanity.all_finite(f"{name}: losses", r["losses"])
        sanity.finite(f"{name}: tokens/s", r["tokens_per_s"], positive=True)
    for name in ("ppo", "grpo"):
        r = results[name]
        sanity.check(r["steps_run"] == 2, f"{name}: {r['steps_run']} steps ran, expected 2")
        sanity.finite(f"{name}: seconds per step", r["step_s"], positive=True)
        sanity.check(r["unscorable"] == 0, f"{name}: {r['unscorable']} samples the grader could not score")

    payload = {"device": device, "arch": arch, "args": {k: str(v) for k, v in vars(args).items()},
               "results": results, "figures": figures, "ratios": ratios, "targets": TARGETS, "targets_met": met,
               "load_before": load_before, "load_after": machine_load(), "sanity_failures": sanity.failures,
               "versions": versions()}
    path = write_results("gpu_check", payload, smoke=args.smoke)
    if args.smoke:
        print("SMOKE RUN (tiny shapes on CPU: the figures say nothing about speed)")
    gib = 2 ** 30
    print(f"{device}: {parameters / 1e6:,.1f}M-parameter Llama, batch {args.batch_size} x {args.seq_len}; "
          f"measured peak {measured / 1e12:.1f} TFLOP/s" + (f", data sheet {sheet / 1e12:.0f}" if sheet else ""))
    for name in ("full", "lora"):
        r = results[name]
        print(f"  {name}: {r['tokens_per_s']:,.0f} tokens/s, peak memory {r['peak_memory'] / gib:.1f} GiB")
    print(f"  full MFU {figures['full_mfu']:.1%} of measured peak (target {TARGETS['full_mfu']:.0%})"
          + (f", {figures['full_mfu_datasheet']:.1%} of data sheet" if sheet else ""))
    print(f"  lora/full tokens/s {ratios['lora/full']:.2f}x (target {TARGETS['lora/full']}x)")
    for name in ("ppo", "grpo"):
        r = results[name]
        print(f"  {name} step: {r['step_s']:.3f} s ({r['samples_per_s']:.1f} samples/s); "
              + ", ".join(f"{k} {v:.3f}s" for k, v in r["split_s"].items()))
    print(f"results: {path.relative_to(REPO)}")
    # The targets are about a GPU: on CPU (smoke or not) only sanity decides.
    return exit_status(sanity, all(met.values()) or not on_gpu(), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
