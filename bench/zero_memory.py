"""Peak memory per rank of DDP, ZeRO-2 and ZeRO-3 (2 CPU ranks) training a ~100M-parameter Llama.

    python bench/zero_memory.py [--steps 3] [--micro-batch 2] [--seq-len 32] [--modes ddp,zero2,zero3]

Builds a randomly initialised fp32 Llama (hidden 768, 12 layers, vocab 8000: 97M parameters), then for
each mode runs a few full fine-tuning steps through TrainingRun under
`accelerate launch --config_file launch/{ddp,zero2,zero3}_cpu.yaml` (gloo; DS_ACCELERATOR=cpu; one
OpenMP thread per rank). Every rank writes:
  peak RSS (ru_maxrss) after imports, after build() and after train();
  the model-state bytes it holds, read at the end of the last optimizer step (a post-step hook on the
  innermost torch optimizer): model parameters (under ZeRO-3 the local shards p.ds_tensor), the
  optimizer's own fp32 copies where they are separate tensors (DeepSpeed's master partitions), gradients
  and AdamW state; each tensor storage is counted once.
Prints these next to the theoretical model states per rank, with 16 bytes per fp32 Adam parameter
(4 param + 4 grad + 8 Adam): DDP 16P, ZeRO-2 4P + 12P/N, ZeRO-3 16P/N. Writes
bench/results/zero_memory-*.json. Exits 1 unless ZeRO-3 holds at most 0.7x DDP's model states per rank.
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

from bench.common import (REPO, build_llama, count_llama_parameters, machine_load, peak_rss_bytes,  # noqa: E402
                          synthetic_rows, versions, write_results, write_text_jsonl)

# ~100M parameters: 12 x 7.08M in the blocks + 2 x 6.1M untied embeddings.
MEDIUM_LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=12, vocab_size=8000)
LAUNCH = {"ddp": "launch/ddp_cpu.yaml", "zero2": "launch/zero2_cpu.yaml", "zero3": "launch/zero3_cpu.yaml"}
ZERO3_LIMIT = 0.7  # ZeRO-3 model states per rank must be at most this fraction of DDP's
GiB = 1024 ** 3


def theoretical_bytes(mode: str, params: int, world: int) -> dict:
    """Model-state bytes per rank for fp32 AdamW: 4 param + 4 grad + 8 Adam per parameter."""
    shard = {"ddp": (1, 1, 1), "zero2": (1, world, world), "zero3": (world, world, world)}[mode]
    p, g, o = (params * size // n for size, n in zip((4, 4, 8), shard))
    return {"parameters": p, "gradients": g, "optimizer": o, "total": p + g + o}


# ---- the rank worker, run under accelerate launch ------------------------------------------------------------

class StateMeter:
    """Counts the model-state bytes a rank holds, each tensor storage once, by category."""

    def __init__(self, model_ref):
        self.model_ref = model_ref
        self.last: dict | None = None

    def __call__(self, optimizer, args, kwargs) -> None:
        seen: set[int] = set()
        sizes = {"parameters": 0, "master_parameters": 0, "gradients": 0, "optimizer": 0}

        def add(kind, tensor):
            if tensor is None or tensor.numel() == 0:
                return
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                return
            seen.add(storage.data_ptr())
            sizes[kind] += storage.nbytes()

        model_params = list(self.model_ref().parameters())
        for p in model_params:
            add("parameters", getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's shard
            add("parameters", p.data)  # the full tensor where it is resident (always, except ZeRO-3)
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in opt_params:
            add("master_parameters", p)
        for p in opt_params + model_params:
            add("gradients", p.grad)
        for state in optimizer.state.values():
            for value in state.values():
                if hasattr(value, "untyped_storage"):
                    add("optimizer", value)
        sizes["total"] = sum(sizes.values())
        sizes["optimizer_numel"] = sum(p.numel() for p in opt_params)
        self.last = sizes


def innermost_optimizer(optimizer):
    """The torch optimizer that does the update: accelerate and DeepSpeed wrap it under `.optimizer`."""
    import torch

    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SystemExit(f"expected a torch optimizer inside the wrappers, found {type(optimizer).__name__}")
    return optimizer


def rank_worker(config: str, out_dir: Path) -> None:
    import weakref

    import torch  # noqa: F401  (imported before the baseline reading, like the engine will)

    import distributed_ft.engine.trainer as trainer_module
    from distributed_ft.train import TrainingRun

    rss_imports = peak_rss_bytes()
    meters: list[StateMeter] = []

    class MeteredTrainer(trainer_module.Trainer):
        """The engine's Trainer, with a post-step hook on the optimizer that does the update."""

        def _prepare(self):
            super()._prepare()
            meter = StateMeter(weakref.ref(self.model))
            inner = innermost_optimizer(self.optimizer)
            inner.register_step_post_hook(meter)
            meter.optimizer_type = f"{type(inner).__module__}.{type(inner).__name__}"
            meter.wrapper_types = []
            obj = self.optimizer
            while hasattr(obj, "optimizer") and obj is not inner:
                meter.wrapper_types.append(type(obj).__name__)
                obj = obj.optimizer
            meters.append(meter)

    trainer_module.Trainer = MeteredTrainer  # TrainingRun.train imports it at call time
    run = TrainingRun(config).build()
    rss_build = peak_rss_bytes()
    started = time.perf_counter()
    result = run.train()
    train_s = time.perf_counter() - started
    rss_train = peak_rss_bytes()
    acc = run.accelerator
    params = list(run.model.parameters())
    meter = meters[0]
    info = {"rank": acc.process_index, "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "zero_stage": acc.state.deepspeed_plugin.zero_stage if acc.state.deepspeed_plugin else None,
            "total_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "local_parameters": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "model_states": meter.last, "optimizer": meter.optimizer_type, "optimizer_wrappers": meter.wrapper_types,
            "peak_rss_imports": rss_imports, "peak_rss_build": rss_build, "peak_rss_train": rss_train,
            "train_s": train_s, "losses": result.losses}
    (out_dir / f"rank-{acc.process_index}.json").write_text(json.dumps(info))
    run.close()


# ---- orchestration ------------------------------------------------------------------------------------------

def run_mode(mode: str, work: Path, args) -> list[dict]:
    out = work / f"out-{mode}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    if mode != "ddp":
        env["DS_ACCELERATOR"] = "cpu"
    config = {
        "model": {"name_or_path": str(work / "model")},
        "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": args.seq_len,
                 "loss_on": "all"},
        "strategy": {"name": "full"},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "learning_rate": 1e-4,
                     "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "output": {"dir": str(work / f"run-{mode}"), "overwrite": True},
    }
    import yaml

    (work / f"{mode}.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCH[mode],
           "--main_process_port", str(args.port), __file__, "--rank-worker", str(work / f"{mode}.yaml"),
           "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    ranks = sorted(out.glob("rank-*.json"))
    if proc.returncode != 0 or len(ranks) != 2:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {mode} launch failed (exit {proc.returncode}, {len(ranks)} rank files)")
    rows = [json.loads(path.read_text()) for path in ranks]
    for row in rows:
        row["launch_wall_s"] = wall
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--modes", default="ddp,zero2,zero3", help="comma-separated subset of ddp,zero2,zero3")
    parser.add_argument("--port", type=int, default=29617, help="rendezvous port of the launches")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per launch")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rank_worker:
        rank_worker(args.rank_worker, args.out)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(LAUNCH))
    if unknown:
        parser.error(f"unknown mode {unknown[0]} (valid: {', '.join(LAUNCH)})")
    n_params = count_llama_parameters(**MEDIUM_LLAMA)
    load_before = machine_load()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dft-zero-bench-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=max(64, args.seq_len), **MEDIUM_LLAMA)
        rows = synthetic_rows(64, args.seq_len, MEDIUM_LLAMA["vocab_size"])
        write_text_jsonl(work / "train.jsonl", rows)
        for mode in modes:
            results[mode] = run_mode(mode, work, args)
            print(f"{mode}: done in {results[mode][0]['launch_wall_s']:.0f} s", flush=True)
    load_after = machine_load()

    world = 2
    print(f"\nLlama {n_params / 1e6:.1f}M parameters fp32, AdamW, {world} CPU ranks, micro batch "
          f"{args.micro_batch} x {args.seq_len} tokens, {args.steps} steps, 1 thread per rank")
    print(f"{'mode':>6} {'rank':>4} {'peak RSS':>9} {'RSS-imports':>11} {'states held':>11} "
          f"{'(param/master/grad/optim)':>26} {'theory':>7} {'local params':>12}")
    summary = {}
    for mode, rows in results.items():
        theory = theoretical_bytes(mode, n_params, world)
        for row in rows:
            s = row["model_states"]
            parts = "/".join(f"{s[k] / GiB:.2f}" for k in ("parameters", "master_parameters", "gradients", "optimizer"))
            print(f"{mode:>6} {row['rank']:>4} {row['peak_rss_train'] / GiB:8.2f}G "
                  f"{(row['peak_rss_train'] - row['peak_rss_imports']) / GiB:10.2f}G {s['total'] / GiB:10.2f}G "
                  f"{parts:>26} {theory['total'] / GiB:6.2f}G {row['local_parameters'] / 1e6:11.1f}M")
        summary[mode] = {"peak_rss_max": max(r["peak_rss_train"] for r in rows),
                         "peak_rss_above_imports_max": max(r["peak_rss_train"] - r["peak_rss_imports"] for r in rows),
                         "model_states_max": max(r["model_states"]["total"] for r in rows),
                         "theoretical": theory}
    ok = True
    if "ddp" in summary:
        base = summary["ddp"]
        for mode in [m for m in summary if m != "ddp"]:
            s = summary[mode]
            states = s["model_states_max"] / base["model_states_max"]
            rss = s["peak_rss_max"] / base["peak_rss_max"]
            above = s["peak_rss_above_imports_max"] / base["peak_rss_above_imports_max"]
            theory = s["theoretical"]["total"] / base["theoretical"]["total"]
            s["vs_ddp"] = {"model_states": states, "peak_rss": rss, "peak_rss_above_imports": above,
                           "theoretical": theory}
            print(f"{mode}/ddp per rank: model states {states:.2f}x (theory {theory:.2f}x), "
                  f"peak RSS {rss:.2f}x, peak RSS above imports {above:.2f}x")
        if "zero3" in summary:
            ok = summary["zero3"]["vs_ddp"]["model_states"] <= ZERO3_LIMIT
            print(f"ZeRO-3 model states <= {ZERO3_LIMIT}x DDP: {'ok' if ok else 'MISSED'}")
    print(f"load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("zero_memory", {
        "model": {**MEDIUM_LLAMA, "parameters": n_params, "dtype": "fp32"}, "world_size": world,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps, "ranks": results,
        "summary": summary, "load_before": load_before, "load_after": load_after, "versions": versions()})
    print(f"results: {path.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
