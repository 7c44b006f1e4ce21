"""The training loop on Accelerate: global-batch sampling, accumulation, clipping, logging, checkpoints.

Every rank draws the same global batch of example indices from the mixing sampler and takes its
own slice. Each rank therefore knows the global count of loss terms, and the loss it backpropagates
is scaled so that the gradient equals the mean over the whole global batch, exactly as one process
with the same global batch would compute it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distributed_ft.data.collate import collate, collate_flat, model_inputs
from distributed_ft.engine.chunked_loss import chunked_loss_for
from distributed_ft.engine.distributed import agree_on_max, report_device, uses_deepspeed
from distributed_ft.engine.length_groups import length_groups, split_to
from distributed_ft.engine.losses import loss_terms, per_example_loss
from distributed_ft.engine.loop import LoopControl
from distributed_ft.engine.optim import build_optimizer, build_scheduler
from distributed_ft.engine.padding_free import padding_free_for


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    stopped_by: str | None = None
    resumed_from: str | None = None


class Trainer:
    def __init__(self, *, config, accelerator, model, tokenizer, data, run_dir: Path, run_logger,
                 on_step=None, on_prepared=None):
        self.config, self.acc, self.data = config, accelerator, data
        self.training = config.training
        self.task = config.model.task
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir)
        self.log = run_logger
        self.on_step = on_step
        self.on_prepared = on_prepared
        self.pad_id = tokenizer.pad_token_id
        self.terms = [loss_terms(ex, self.task) for ex in data.train]
        self.lengths = [len(ex["input_ids"]) for ex in data.train]
        self.model = model
        self.computed_tokens = 0   # tokens the passes computed, padding included (this rank, this step)

    def prepare(self):
        """Wrap model and optimizer for the launch (DDP, DeepSpeed engine); idempotent."""
        if getattr(self, "optimizer", None) is not None:
            return
        optimizer = build_optimizer(self.model, self.training)
        if self.training.compile:
            compile_model(self.acc, self.model)
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        report_device(self.acc)
        self.scheduler = build_scheduler(self.optimizer, self.training)
        self.acc.register_for_checkpointing(self.scheduler)
        self.chunked_loss = chunked_loss_for(self.acc.unwrap_model(self.model), self.task,
                                             self.training.loss_chunk_tokens, agree_on_max(self.acc))
        # a causal LM's loss only: a classifier's examples go padded (a reward model's scores go flat in dft rm)
        self.not_padding_free = (padding_free_for(self.acc.unwrap_model(self.model), self.task,
                                                  self.training.padding_free)
                                 if self.task == "causal_lm" else f"task {self.task}")
        if self.on_prepared is not None:
            self.on_prepared(self.model)

    def train(self, sampler) -> TrainResult:
        self.prepare()
        acc, training = self.acc, self.training
        world, micro, accum = acc.num_processes, training.micro_batch_size, training.gradient_accumulation_steps
        result = TrainResult(step=0)
        n_tasks = len(self.data.tasks)
        with LoopControl(acc, training, self.run_dir, self.log) as loop:
            resumed = loop.resume()
            if resumed is not None:
                sampler.load_state_dict(resumed.state["sampler"])
                result.step, result.resumed_from = resumed.step, resumed.folder
            self.model.train()
            while result.step < training.max_steps:
                started = time.perf_counter()
                global_idx = sampler.next_indices(micro * accum * world)
                n_terms = max(1, sum(self.terms[i] for i in global_idx))
                self.computed_tokens = 0
                stats, grad_norm = self._step(global_idx, n_terms, n_tasks)
                if not result.losses:  # this process's first step
                    self._say_batching(global_idx)
                lr = self.scheduler.get_last_lr()[0]  # the rate this step used
                self.scheduler.step()
                result.step += 1
                stats[-1] = 1.0 if loop.stop_requested_here else 0.0  # agreed in the same reduce as the losses
                stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu()
                loss = float(stats[:n_tasks].sum() / n_terms)
                result.losses.append(loss)
                if uses_deepspeed(acc):
                    grad_norm = self.model.get_global_grad_norm()
                elapsed = time.perf_counter() - started
                tokens = sum(self.lengths[i] for i in global_idx)
                self._log(result.step, loss, lr, stats, n_tasks, grad_norm, tokens / elapsed)
                if self.on_step is not None:
                    self.on_step(result.step)
                if loop.end_of_step(result.step, lambda: {"sampler": sampler.state_dict()}, bool(stats[-1] > 0)):
                    result.stopped_by = loop.stopped_by
                    break
        return result

    def _step(self, global_idx: list[int], n_terms: int, n_tasks: int):
        """One optimizer step over this rank's slices of the global batch.

        Returns per-task loss sums and loss-term counts (plus a slot for the stop flag) and the
        gradient norm when it is known here.
        """
        acc, training = self.acc, self.training
        world, rank, micro = acc.num_processes, acc.process_index, training.micro_batch_size
        accum = training.gradient_accumulation_steps
        stats = torch.zeros(2 * n_tasks + 1, dtype=torch.float64)
        grad_norm = None
        for a in range(accum):
            local = global_idx[(a * world + rank) * micro:(a * world + rank + 1) * micro]
            passes = self._passes(local)
            with acc.accumulate(self.model):
                for p, rows in enumerate(passes):
                    examples = [self.data.train[i] for i in rows]
                    batch = collate_flat(examples) if self._flat(examples) else collate(examples, self.pad_id)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    # the micro-batch's last pass reduces the gradients of all of them
                    with contextlib.nullcontext() if p == len(passes) - 1 else _reduce_later(acc, self.model):
                        per_example = self._forward(batch)
                        acc.backward(per_example.sum() / n_terms * world * accum)
                    tasks = batch["task_ids"].cpu()
                    stats[:n_tasks].index_add_(0, tasks, per_example.detach().double().cpu())
                    stats[n_tasks:2 * n_tasks].index_add_(
                        0, tasks, torch.tensor([float(self.terms[i]) for i in rows], dtype=torch.float64))
                if acc.sync_gradients and not uses_deepspeed(acc):  # DeepSpeed clips and measures itself
                    # an infinite bound measures the global norm without clipping
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), training.max_grad_norm or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    def _say_batching(self, global_idx: list[int]) -> None:
        """The run log's line on how the first step's rows were batched, and what that saved."""
        from distributed_ft.engine.logging import logger

        acc, micro = self.acc, self.training.micro_batch_size
        slices = [global_idx[s:s + micro] for s in range(0, len(global_idx), micro)]
        padded = sum(len(s) * max(self.lengths[i] for i in s) for s in slices)
        useful = sum(self.lengths[i] for i in global_idx)
        computed = int(acc.reduce(torch.tensor([self.computed_tokens], device=acc.device), reduction="sum"))
        if self.not_padding_free is None:
            how = "padding-free: each micro-batch's examples end to end in one row, attention within each example"
        else:
            how = (f"not padding-free ({self.not_padding_free}); " +
                   ("length-grouped passes (training.length_grouping)" if self.training.length_grouping
                    else "one padded pass per micro-batch (training.length_grouping off)"))
        logger.info(f"batches: {how}; the first step computed {computed:,} tokens for {useful:,} real ones "
                    f"(padded micro-batches: {padded:,})")

    def _passes(self, local: list[int]) -> list[list[int]]:
        """This rank's micro-batch as forward/backward passes: one when padding-free or when length grouping is
        off, else over rows of similar length. DeepSpeed reduces gradients in every backward, so its ranks agree
        on the number of passes."""
        lengths = [self.lengths[i] for i in local]
        if self.not_padding_free is None:
            self.computed_tokens += sum(lengths)
            return [local]
        if not self.training.length_grouping:
            self.computed_tokens += len(local) * max(lengths)
            return [local]
        groups = length_groups(lengths)
        if uses_deepspeed(self.acc) and self.acc.num_processes > 1:
            count = int(self.acc.gather(torch.tensor([len(groups)], device=self.acc.device)).max())
            groups = split_to(groups, lengths, count)
        self.computed_tokens += sum(len(g) * max(lengths[j] for j in g) for g in groups)
        return [[local[j] for j in group] for group in groups]

    def _flat(self, examples: list[dict]) -> bool:
        """Whether a pass goes as one flat row: when padding-free and its rows would need padding or hold
        packed examples (rows of one length, each one example, run faster as a batch and need no mask)."""
        if self.not_padding_free is not None:
            return False
        return len({len(ex["input_ids"]) for ex in examples}) > 1 or any("position_ids" in ex for ex in examples)

    def _forward(self, batch: dict) -> torch.Tensor:
        example_of = batch.get("example_of")  # a flat batch's examples (None: one per row)
        if self.chunked_loss is not None:
            return self.chunked_loss(self.model, model_inputs(batch), batch["labels"], example_of)
        logits = self.model(**model_inputs(batch)).logits
        return per_example_loss(logits, batch["labels"], self.task, example_of)

    def _log(self, step, loss, lr, stats, n_tasks, grad_norm, tokens_per_s) -> None:
        if not (step % self.config.logging.log_every == 0 or step == 1 or step == self.training.max_steps):
            self.log.progress(step, loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            return
        row = {"step": step, "loss": loss, "lr": lr,
               "tokens_per_s": round(tokens_per_s, 1)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if n_tasks > 1:
            for t, name in enumerate(self.data.tasks):
                if stats[n_tasks + t] > 0:
                    row[f"loss/{name}"] = float(stats[t] / stats[n_tasks + t])
        self.log.log(row)
        self.log.progress(step, loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")


def compile_model(acc, model) -> None:
    """torch.compile in place: the module and its parameter names stay as they are, for the optimizer, the
    checkpoints and the saved model. Shapes that vary between passes are compiled once as dynamic."""
    from distributed_ft.engine.logging import logger
    from distributed_ft.errors import ConfigError

    if uses_deepspeed(acc):
        raise ConfigError("training.compile is not supported under DeepSpeed launches; set training.compile=false")
    model.compile()
    logger.info("model: torch.compile (training.compile); the first steps include its compilation")


@contextlib.contextmanager
def _reduce_later(acc, model):
    """Backward passes that add into this rank's gradients without reducing them across ranks (DDP's no_sync;
    for DeepSpeed, not an accumulation boundary): a later pass of the same micro-batch reduces them all."""
    state = acc.gradient_state
    syncing = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        with acc.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(syncing)
