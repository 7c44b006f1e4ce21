"""Seconds per AdamW step over a model's parameters: the engine's optimizer (engine/optim.py: torch's fused
kernel) against torch's AdamW as a hand-written loop gets it (per-tensor on CPU) and its foreach form.

    python bench/optimizer_step.py [--model 100m] [--steps 5] [--threads 2]
    python bench/optimizer_step.py --smoke      # the 0.15M model, 2 steps; the parameters are checked to agree

Every variant starts from the same fp32 parameters and the same fixed gradients (a seeded normal, scale 1e-3)
and takes --steps steps after one warm-up step; the figure is the median step time. After the steps every
variant's parameters must equal the per-tensor ones (rel 1e-5): the kernels compute the same update. Target:
engine >= 1.5x the per-tensor default. Writes bench/results/optimizer_step-*.json; exits 1 when the parameters
disagree or (full runs) the target is missed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LLAMA_100M, SMALL_LLAMA, TINY_LLAMA, Sanity, count_llama_parameters,  # noqa: E402
                          exit_status, median, parse_args, versions, write_results)

MODELS = {"tiny": TINY_LLAMA, "small": SMALL_LLAMA, "100m": LLAMA_100M}
SMOKE = {"model": "tiny", "steps": 2, "threads": 1}
TARGET = 1.5  # engine / per_tensor


def model_parameters(arch: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch, tie_word_embeddings=False))
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return model


def optimizer(variant: str, model):
    import torch

    from distributed_ft.engine.config import TrainingConfig
    from distributed_ft.engine.optim import build_optimizer

    if variant == "engine":
        return build_optimizer(model, TrainingConfig(learning_rate=1e-4))
    groups = build_optimizer(model, TrainingConfig(learning_rate=1e-4, fused_optimizer=False)).param_groups
    return torch.optim.AdamW(groups, lr=1e-4, foreach=(variant == "foreach"))


def measure(variant: str, arch: dict, steps: int) -> SimpleNamespace:
    model = model_parameters(arch)
    opt = optimizer(variant, model)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return SimpleNamespace(seconds=median(times[1:]), params=[p.detach().clone() for p in model.parameters()])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="100m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    args = parse_args(parser, SMOKE)
    torch.set_num_threads(args.threads)
    arch = MODELS[args.model]
    sanity = Sanity()
    runs = {variant: measure(variant, arch, args.steps) for variant in ("per_tensor", "foreach", "engine")}
    for variant, run in runs.items():
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(run.params, runs["per_tensor"].params))
        sanity.check(same, f"{variant}: parameters after {args.steps + 1} steps differ from per_tensor's")
    ratio = runs["per_tensor"].seconds / runs["engine"].seconds
    met = ratio >= TARGET
    params = count_llama_parameters(**arch)
    print(f"AdamW step over {params / 1e6:.1f}M parameters, {args.threads} threads, median of {args.steps}")
    for variant, run in runs.items():
        print(f"  {variant:>10}: {run.seconds * 1000:8.1f} ms")
    verdict = "not checked in a smoke run" if args.smoke else ("ok" if met else "MISSED")
    print(f"  engine/per_tensor: {ratio:.2f}x  (target >= {TARGET}x: {verdict})")
    path = write_results("optimizer_step", {
        "model": {**arch, "name": args.model, "parameters": params}, "threads": args.threads, "steps": args.steps,
        "seconds_per_step": {v: r.seconds for v, r in runs.items()}, "ratios": {"engine/per_tensor": ratio},
        "target": TARGET, "target_met": met, "sanity_failures": sanity.failures, "versions": versions()},
        smoke=args.smoke)
    print(f"  results: {path}")
    return exit_status(sanity, met, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
