"""Peak memory per rank of DDP, ZeRO-2 and ZeRO-3 (2 CPU ranks) training a ~100M-parameter Llama.

    python bench/zero_memory.py [--steps 3] [--micro-batch 2] [--seq-len 32] [--modes ddp,zero2,zero3]
    python bench/zero_memory.py --smoke         # ddp, zero2, zero3 at tiny sizes; the ZeRO-3 target not checked

Builds a randomly initialised fp32 Llama (hidden 768, 12 layers, vocab 8000: 97M parameters), then for
each mode runs a few full fine-tuning steps through SFTRun under
`accelerate launch --config_file launch/{ddp,zero2,zero3}_cpu.yaml` (gloo; DS_ACCELERATOR=cpu; one
OpenMP thread per rank). Every rank writes:
  peak RSS (ru_maxrss) after imports, after build(), after prepare() and after train(), and the
  current RSS right after the last optimizer update;
  the model-state bytes it holds, read at the end of the last optimizer step (a post-step hook on the
  innermost torch optimizer): model parameters (under ZeRO-3 the local shards p.ds_tensor), the
  optimizer's own fp32 copies where they are separate tensors (DeepSpeed's master partitions), gradients
  and AdamW state; each tensor storage is counted once.
Prints these next to the theoretical model states per rank, with 16 bytes per fp32 Adam parameter
(4 param + 4 grad + 8 Adam): DDP 16P, ZeRO-2 4P + 12P/N, ZeRO-3 16P/N. Writes
bench/results/zero_memory-*.json. Exits 1 unless ZeRO-3 holds at most 0.7x DDP's model states per rank, or
when a rank did not train sanely (not the mode asked for, fewer steps, a non-finite loss, no model states).
--smoke: a 0.15M-parameter Llama, 1 step of micro batch 1 x 16 tokens, modes ddp, zero2 and zero3 (the
zero3_release config is written and read back, not launched: add it with --modes); only the sanity checks
decide its exit status.
Optional: mode zero3_release (ZeRO-3 releasing gathered parameters right after use) and
--malloc-mmap-threshold (a fixed glibc mmap threshold in the ranks); see bench/README.md.
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

from bench.common import (REPO, TINY_LLAMA, Sanity, build_llama, count_llama_parameters,  # noqa: E402
                          current_rss_bytes, exit_status, machine_load, parse_args, peak_rss_bytes, run_process,
                          synthetic_rows, versions, write_results, write_text_jsonl)

# ~100M parameters: 12 x 7.08M in the blocks + 2 x 6.1M untied embeddings.
MEDIUM_LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=12, vocab_size=8000)
LAUNCH = {"ddp": "launch/ddp_cpu.yaml", "zero2": "launch/zero2_cpu.yaml", "zero3": "launch/zero3_cpu.yaml"}
# Optional mode: launch/zero3_cpu.yaml with gathered parameters released right after use. DeepSpeed's defaults
# (1e9 live parameters, reuse distance 1e9) let a model under 1e9 parameters stay gathered through the step.
ZERO3_RELEASE = {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}
MODES = (*LAUNCH, "zero3_release")
ZERO3_LIMIT = 0.7  # ZeRO-3 model states per rank must be at most this fraction of DDP's
GiB = 1024 ** 3
SMOKE = {"steps": 1, "micro_batch": 1, "seq_len": 16, "modes": ",".join(LAUNCH), "timeout": 300}
ZERO_STAGE = {"ddp": None, "zero2": 2, "zero3": 3, "zero3_release": 3}  # what each mode must run


def theoretical_bytes(mode: str, params: int, world: int) -> dict:
    """Model-state bytes per rank for fp32 AdamW: 4 param + 4 grad + 8 Adam per parameter."""
    shard = {"ddp": (1, 1, 1), "zero2": (1, world, world), "zero3": (world, world, world),
             "zero3_release": (world, world, world)}[mode]
    p, g, o = (params * size // n for size, n in zip((4, 4, 8), shard))
    # DeepSpeed also keeps an fp32 master copy of this rank's partition apart from the model's parameters.
    master = 0 if mode == "ddp" else 4 * params // world
    return {"parameters": p, "gradients": g, "optimizer": o, "total": p + g + o,
            "total_with_master_copy": p + g + o + master}


# ---- the rank worker, run under accelerate launch ------------------------------------------------------------

class StateMeter:
    """Counts the model-state bytes a rank holds, each tensor storage once, by category.

    Called after every update of the innermost optimizer: DeepSpeed ZeRO-2 updates one parameter group
    at a time (only that group is in `param_groups` during its update), so the tensors seen are
    collected over the calls of one training step and summed when the step ends (`step_done`).
    Only sizes are kept, never the tensors, so measuring does not extend any tensor's life.
    """

    KINDS = ("parameters", "master_parameters", "gradients", "optimizer")

    def __init__(self, model_ref):
        self.model_ref = model_ref
        self.storages: dict[int, tuple[str, int]] = {}  # storage address -> (kind, bytes)
        self.rss = 0
        self.last: dict | None = None

    def _add(self, kind: str, tensor) -> None:
        if tensor is None or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.storages:
            self.storages[storage.data_ptr()] = (kind, storage.nbytes())

    def __call__(self, optimizer, args, kwargs) -> None:
        model_params = list(self.model_ref().parameters())
        for p in model_params:
            self._add("parameters", getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's shard
            self._add("parameters", p.data)  # the full tensor where it is resident (always, except ZeRO-3)
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in opt_params:
            self._add("master_parameters", p)
        for p in opt_params + model_params:
            self._add("gradients", p.grad)
        for state in optimizer.state.values():
            for value in state.values():
                if hasattr(value, "untyped_storage"):
                    self._add("optimizer", value)
        self.rss = current_rss_bytes()

    def step_done(self, step) -> None:
        sizes = dict.fromkeys(self.KINDS, 0)
        for kind, nbytes in self.storages.values():
            sizes[kind] += nbytes
        self.last = {**sizes, "total": sum(sizes.values()), "rss_at_update": self.rss}
        self.storages = {}


def rank_worker(config: str, out_dir: Path) -> None:
    import weakref

    import torch

    from distributed_ft.recipes.sft import SFTRun

    rss_imports = peak_rss_bytes()
    run = SFTRun(config).build()
    rss_build = peak_rss_bytes()
    run.prepare()
    rss_prepare = peak_rss_bytes()
    wrappers, inner = [], run.trainer.optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        wrappers.append(type(inner).__name__)
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise SystemExit(f"expected a torch optimizer inside the wrappers, found {type(inner).__name__}")
    meter = StateMeter(weakref.ref(run.trainer.model))
    inner.register_step_post_hook(meter)
    engine_on_step = run.trainer.on_step

    def on_step(step):
        meter.step_done(step)
        if engine_on_step is not None:
            engine_on_step(step)

    run.trainer.on_step = on_step
    started = time.perf_counter()
    result = run.train()
    train_s = time.perf_counter() - started
    rss_train = peak_rss_bytes()
    acc = run.accelerator
    params = list(run.model.parameters())
    info = {"rank": acc.process_index, "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "zero_stage": acc.state.deepspeed_plugin.zero_stage if acc.state.deepspeed_plugin else None,
            "total_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "local_parameters": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "model_states": meter.last, "optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
            "optimizer_wrappers": wrappers,
            "peak_rss_imports": rss_imports, "peak_rss_build": rss_build,
            "peak_rss_prepare": rss_prepare, "peak_rss_train": rss_train,
            "train_s": train_s, "losses": result.losses}
    (out_dir / f"rank-{acc.process_index}.json").write_text(json.dumps(info))
    run.close()


# ---- orchestration ------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on this host now: a fixed one can collide with other launches on a shared machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_config(mode: str, work: Path) -> str:
    """The accelerate config file of a mode; zero3_release is written from the zero3 files into `work`."""
    if mode in LAUNCH:
        return LAUNCH[mode]
    import yaml

    accelerate_cfg = yaml.safe_load((REPO / LAUNCH["zero3"]).read_text())
    ds_cfg = json.loads((REPO / accelerate_cfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
    ds_cfg["zero_optimization"].update(ZERO3_RELEASE)
    (work / "ds_zero3_release.json").write_text(json.dumps(ds_cfg, indent=2))
    accelerate_cfg["deepspeed_config"]["deepspeed_config_file"] = str(work / "ds_zero3_release.json")
    (work / "accelerate_zero3_release.yaml").write_text(yaml.safe_dump(accelerate_cfg))
    return str(work / "accelerate_zero3_release.yaml")


def run_mode(mode: str, work: Path, args) -> list[dict]:
    out = work / f"out-{mode}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    if mode != "ddp":
        env["DS_ACCELERATOR"] = "cpu"
    if args.malloc_mmap_threshold:
        # A fixed glibc mmap threshold returns freed large blocks to the system at once; by default the
        # threshold grows with the blocks freed and the heap keeps them, which peak RSS then counts.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    config = {
        "model": {"name_or_path": str(work / "model")},
        "data": {"train": [{"path": str(work / "train.jsonl"), "format": "text"}], "max_length": args.seq_len,
                 "loss_on": "all"},
        "strategy": {"name": "full"},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "learning_rate": 1e-4,
                     "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "eval": {"enabled": False},
        "output": {"dir": str(work / f"run-{mode}"), "overwrite": True},
    }
    import yaml

    (work / f"run-{mode}.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_config(mode, work),
           "--main_process_port", str(args.port or free_port()), __file__, "--rank-worker", str(work / f"run-{mode}.yaml"),
           "--out", str(out)]
    started = time.perf_counter()
    proc = run_process(cmd, env, args.timeout)
    wall = time.perf_counter() - started
    ranks = sorted(out.glob("rank-*.json"))
    if proc.returncode != 0 or len(ranks) != 2:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {mode} launch failed (exit {proc.returncode}, {len(ranks)} rank files)")
    rows = [json.loads(path.read_text()) for path in ranks]
    for row in rows:
        row["launch_wall_s"] = wall
    return rows


def check_rank(sanity: Sanity, mode: str, row: dict, steps: int) -> None:
    """A rank must have run its mode for every step asked, with finite losses and model states measured."""
    name = f"{mode} rank {row['rank']}"
    sanity.check(row["world_size"] == 2, f"{name}: world size {row['world_size']}, expected 2")
    sanity.check(row["zero_stage"] == ZERO_STAGE[mode],
                 f"{name}: ZeRO stage {row['zero_stage']} ({row['distributed_type']}), expected {ZERO_STAGE[mode]}")
    sanity.check(len(row["losses"]) == steps, f"{name}: {len(row['losses'])} steps ran, expected {steps}")
    sanity.all_finite(f"{name}: losses", row["losses"])
    states = row["model_states"] or {}
    sanity.finite(f"{name}: model-state bytes", states.get("total"), positive=True)
    sanity.check(0 < row["local_parameters"] <= row["total_parameters"],
                 f"{name}: {row['local_parameters']} local of {row['total_parameters']} parameters")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--modes", default="ddp,zero2,zero3",
                        help=f"comma-separated subset of {','.join(MODES)} (zero3_release: ZeRO-3 with "
                             f"{ZERO3_RELEASE})")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ in the ranks (e.g. 131072), so peak RSS counts live "
                             "memory rather than freed blocks glibc keeps")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port of the launches (default: a free one "
                                                             "per launch)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per launch")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)

    if args.rank_worker:
        from distributed_ft.engine.process_exit import exit_process

        rank_worker(args.rank_worker, args.out)
        # Native teardown at interpreter exit (gloo threads, DeepSpeed ops) can abort a rank whose work is
        # done ("terminate called without an active exception"): leave as the library's own ranks do.
        exit_process(0)

    import yaml

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]} (valid: {', '.join(MODES)})")
    arch = TINY_LLAMA if args.smoke else MEDIUM_LLAMA
    n_params = count_llama_parameters(**arch)
    sanity = Sanity()
    load_before = machine_load()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dft-zero-bench-") as tmp:
        work = Path(tmp)
        build_llama(work / "model", max_position_embeddings=max(64, args.seq_len), **arch)
        rows = synthetic_rows(64, args.seq_len, arch["vocab_size"])
        write_text_jsonl(work / "train.jsonl", rows)
        if args.smoke and "zero3_release" not in modes:  # its config is derived from the shipped files: check it
            release = yaml.safe_load(Path(launch_config("zero3_release", work)).read_text())
            ds_file = Path(release["deepspeed_config"]["deepspeed_config_file"])
            zero = json.loads(ds_file.read_text())["zero_optimization"]
            sanity.check(zero["stage"] == 3 and all(zero[k] == v for k, v in ZERO3_RELEASE.items()),
                         f"zero3_release config {ds_file.name}: zero_optimization {zero}")
        for mode in modes:
            results[mode] = run_mode(mode, work, args)
            for row in results[mode]:
                check_rank(sanity, mode, row, args.steps)
            print(f"{mode}: done in {results[mode][0]['launch_wall_s']:.0f} s", flush=True)
    load_after = machine_load()

    world = 2
    print(f"\n{'SMOKE RUN (tiny sizes, target not checked): ' if args.smoke else ''}"
          f"Llama {n_params / 1e6:.2f}M parameters fp32, AdamW, {world} CPU ranks, micro batch "
          f"{args.micro_batch} x {args.seq_len} tokens, {args.steps} steps, 1 thread per rank, "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'unset'}")
    print(f"{'mode':>13} {'rank':>4} {'peak RSS':>9} {'RSS-imports':>11} {'states held':>11} "
          f"{'(param/master/grad/optim)':>26} {'theory':>7} {'local params':>12} {'RSS@update':>10}")
    summary = {}
    for mode, rows in results.items():
        theory = theoretical_bytes(mode, n_params, world)
        for row in rows:
            s = row["model_states"]
            parts = "/".join(f"{s[k] / GiB:.2f}" for k in ("parameters", "master_parameters", "gradients", "optimizer"))
            print(f"{mode:>13} {row['rank']:>4} {row['peak_rss_train'] / GiB:8.2f}G "
                  f"{(row['peak_rss_train'] - row['peak_rss_imports']) / GiB:10.2f}G {s['total'] / GiB:10.2f}G "
                  f"{parts:>26} {theory['total'] / GiB:6.2f}G {row['local_parameters'] / 1e6:11.1f}M "
                  f"{s['rss_at_update'] / GiB:9.2f}G")
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
            master = s["theoretical"]["total_with_master_copy"] / base["theoretical"]["total"]
            s["vs_ddp"] = {"model_states": states, "peak_rss": rss, "peak_rss_above_imports": above,
                           "theoretical": theory, "theoretical_with_master_copy": master}
            print(f"{mode}/ddp per rank: model states {states:.2f}x (theory {theory:.2f}x, "
                  f"{master:.2f}x with DeepSpeed's fp32 master copy), "
                  f"peak RSS {rss:.2f}x, peak RSS above imports {above:.2f}x")
        if "zero3" in summary:  # the pass condition is on the shipped configuration
            ok = summary["zero3"]["vs_ddp"]["model_states"] <= ZERO3_LIMIT
            verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok else "MISSED")
            print(f"ZeRO-3 model states <= {ZERO3_LIMIT}x DDP: {verdict}")
    print(f"load average (1m) {load_before['loadavg_1m']} before, {load_after['loadavg_1m']} after, "
          f"{load_after['cpus']} cpus")
    path = write_results("zero_memory", {
        "model": {**arch, "parameters": n_params, "dtype": "fp32"}, "world_size": world,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold, "ranks": results,
        "summary": summary, "load_before": load_before, "load_after": load_after,
        "sanity_failures": sanity.failures, "versions": versions()}, smoke=args.smoke)
    print(f"results: {path.relative_to(REPO)}")
    return exit_status(sanity, ok, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
