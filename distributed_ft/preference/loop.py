"""The pairwise training loop the `rm` and `dpo` recipes share, on the engine's accelerator, optimizer,
schedule and loop control (resume, agreed stop, periodic checkpoints).

As in the SFT loop, every rank draws the same global batch of pair indices and takes its own slices; the
loss it backpropagates is scaled so that the gradient is the mean over the whole global batch, as one
process with the same global batch computes it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from distributed_ft.data.mixing import WeightedMixSampler
from distributed_ft.engine.distributed import report_device, uses_deepspeed
from distributed_ft.engine.loop import LoopControl
from distributed_ft.engine.optim import build_optimizer, build_scheduler
from distributed_ft.engine.trainer import TrainResult

# pair_loss(model, pair indices) -> (per-pair loss, {metric name: per-pair values})
PairLoss = Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class PairLoop:
    def __init__(self, *, accelerator, model, training, run_dir: Path, run_logger, n_pairs: int, pair_loss: PairLoss,
                 metric_names: list[str], log_every: int, on_prepared=None):
        self.acc, self.model, self.training = accelerator, model, training
        self.run_dir, self.log, self.n_pairs = Path(run_dir), run_logger, n_pairs
        self.pair_loss, self.metric_names, self.log_every = pair_loss, metric_names, log_every
        self.on_prepared = on_prepared
        self.optimizer = None

    def prepare(self) -> None:
        if self.optimizer is not None:
            return
        optimizer = build_optimizer(self.model, self.training)
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        report_device(self.acc)
        self.scheduler = build_scheduler(self.optimizer, self.training)
        self.acc.register_for_checkpointing(self.scheduler)
        if self.on_prepared is not None:
            self.on_prepared(self.model)

    def train(self) -> TrainResult:
        self.prepare()
        acc, training = self.acc, self.training
        world, micro, accum = acc.num_processes, training.micro_batch_size, training.gradient_accumulation_steps
        sampler = WeightedMixSampler([self.n_pairs], [1.0], training.seed)
        result = TrainResult(step=0)
        with LoopControl(acc, training, self.run_dir, self.log) as loop:
            resumed = loop.resume()
            if resumed is not None:
                sampler.load_state_dict(resumed.state["sampler"])
                result.step, result.resumed_from = resumed.step, resumed.folder
            self.model.train()
            while result.step < training.max_steps:
                started = time.perf_counter()
                global_idx = sampler.next_indices(micro * accum * world)
                stats, grad_norm = self._step(global_idx)
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                result.step += 1
                stats[-1] = 1.0 if loop.stop_requested_here else 0.0  # agreed in the same reduce as the losses
                stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu() / len(global_idx)
                result.losses.append(float(stats[0]))
                if uses_deepspeed(acc):
                    grad_norm = self.model.get_global_grad_norm()
                row = {"step": result.step, "loss": float(stats[0]), "lr": lr,
                       **{name: float(v) for name, v in zip(self.metric_names, stats[1:-1])},
                       "pairs_per_s": round(len(global_idx) / (time.perf_counter() - started), 2)}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                if result.step % self.log_every == 0 or result.step in (1, training.max_steps):
                    self.log.log(row)
                self.log.progress(result.step, loss=f"{row['loss']:.4f}")
                if loop.end_of_step(result.step, lambda: {"sampler": sampler.state_dict()}, bool(stats[-1] > 0)):
                    result.stopped_by = loop.stopped_by
                    break
        return result

    def _step(self, global_idx: list[int]):
        """One optimizer step over this rank's slices; returns the sums of loss and metrics (+ a stop slot)."""
        acc, training = self.acc, self.training
        world, rank, micro = acc.num_processes, acc.process_index, training.micro_batch_size
        accum = training.gradient_accumulation_steps
        stats = torch.zeros(2 + len(self.metric_names), dtype=torch.float64)
        grad_norm = None
        for a in range(accum):
            local = global_idx[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            with acc.accumulate(self.model):
                losses, metrics = self.pair_loss(self.model, local)
                acc.backward(losses.sum() / len(global_idx) * world * accum)
                if acc.sync_gradients and not uses_deepspeed(acc):  # DeepSpeed clips and measures itself
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), training.max_grad_norm or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            stats[0] += float(losses.detach().double().sum())
            for i, name in enumerate(self.metric_names):
                stats[1 + i] += float(metrics[name].detach().double().sum())
        return stats, grad_norm


def sharded_map(accelerator, n: int, batch_size: int, score: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """score(indices) -> [len(indices), k] for every index in range(n), the work split over ranks.

    Every rank runs the same number of batches (the last ones padded with repeats), so collective forwards
    (ZeRO-3) stay in step; the results are gathered and put back in index order on every rank.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-n // world)
    mine = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)] if n else []
    parts = [score(mine[s:s + batch_size]).detach().float() for s in range(0, len(mine), batch_size)]
    local = torch.cat(parts).to(accelerator.device)
    every = accelerator.gather(local).cpu() if world > 1 else local.cpu()
    return every[:n]
