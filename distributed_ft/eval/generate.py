"""Sharded model inference for evaluation: generation, label prediction and reference loss.

Inputs are split into contiguous shards, one per process. Every process runs the same number of
batches (a process with a short shard runs a dummy batch and drops it), because under DeepSpeed
ZeRO-3 each batch gathers the parameters collectively. Results are gathered as (index, value)
pairs, so the duplicates that uneven splits would add never appear, and every process returns the
full list in the original order.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from distributed_ft.engine.chunked_loss import chunked_loss_for
from distributed_ft.engine.config import DEFAULT_LOSS_CHUNK_TOKENS
from distributed_ft.engine.distributed import agree_on_max, gathers_per_module_call
from distributed_ft.eval.metrics import loss_and_perplexity
from distributed_ft.tasks import IGNORE_INDEX


def shard_range(n: int, num_processes: int, rank: int) -> range:
    """Contiguous shard of `n` items for `rank`; the first n % num_processes ranks get one extra."""
    base, extra = divmod(n, num_processes)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def plan_batches(lengths: Sequence[int], num_processes: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of item indices; the same count on every rank (an empty list = dummy batch).

    Within a shard, items are sorted longest first so each batch holds similar lengths (little padding).
    """
    n = len(lengths)
    indices = sorted(shard_range(n, num_processes, rank), key=lambda i: (-lengths[i], i))
    n_batches = math.ceil(math.ceil(n / num_processes) / batch_size) if n else 0
    return [indices[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


@contextlib.contextmanager
def _padding(tokenizer: Any, side: str) -> Iterator[None]:
    """Set the padding side (and a pad token if missing) for the duration of the block."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = old_pad


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed sampling without disturbing the caller's (training) RNG streams."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _unwrapped(model: torch.nn.Module, accelerator: Any) -> Iterator[torch.nn.Module]:
    """The bare model with ZeRO-3 parameters gathered once for the block (a collective under ZeRO-3)."""
    from trl.models.utils import unwrap_model_for_generation

    with warnings.catch_warnings():
        # trl reads a transformers attribute that is deprecated but still correct
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        with unwrap_model_for_generation(model, accelerator) as bare:
            yield bare


def _needs_synced_steps(accelerator: Any) -> bool:
    """Whether every process must run the same number of decoding steps.

    Under ZeRO-3 the model keeps a start-of-forward hook that checks its trace with a small collective on
    every forward pass, even while the parameters are gathered; so ranks keep stepping (HF's synced_gpus)
    until all of them are done. The parameters are still gathered once per batch.
    """
    return gathers_per_module_call(accelerator)


def _gather(pairs: list[tuple[int, Any]], n: int, accelerator: Any) -> list[Any]:
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    out: list[Any] = [None] * n
    for index, value in pairs:
        out[index] = value
    return out


def _token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def generate_predictions(model: torch.nn.Module, tokenizer: Any, prompts: list[str], accelerator: Any,
                         cfg: Any) -> list[str]:
    """Generate a completion for every prompt, sharded across processes; every process gets all of them.

    `cfg` needs batch_size, max_new_tokens, do_sample, temperature, top_p and seed (EvalConfig has them).
    Only the new tokens are decoded, without special tokens, and stripped of surrounding whitespace.
    Greedy results do not depend on the process count; sampling (seeded with seed + rank) is
    reproducible for a given process count.
    """
    n = len(prompts)
    if n == 0:
        return []
    batches = plan_batches(_token_lengths(tokenizer, prompts), accelerator.num_processes,
                           accelerator.process_index, cfg.batch_size)
    dummy = min(range(n), key=lambda i: len(prompts[i]))
    gen_kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                                  "synced_gpus": _needs_synced_steps(accelerator)}
    if cfg.do_sample:
        gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    local: list[tuple[int, str]] = []
    with _padding(tokenizer, "left"), _eval_mode(model), _seeded(cfg.seed + accelerator.process_index):
        gen_kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for batch in batches:
            texts = [prompts[i] for i in batch] or [prompts[dummy]]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(accelerator.device)
            # a dummy batch only has to take part in the parameter gather: one token is enough
            extra = {} if batch else {"max_new_tokens": 1}
            with _unwrapped(model, accelerator) as bare:
                out = bare.generate(**enc, **{**gen_kwargs, **extra})
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            local.extend((i, text.strip()) for i, text in zip(batch, decoded))
    return _gather(local, n, accelerator)


def predict_labels(model: torch.nn.Module, tokenizer: Any, texts: list[str], accelerator: Any, cfg: Any,
                   task_type: str | None = None) -> list[Any]:
    """Sharded forward passes of a sequence-classification model: class ids, or floats for regression.

    The task type defaults to regression when the model has one output (num_labels == 1).
    """
    n = len(texts)
    if n == 0:
        return []
    bare_config = accelerator.unwrap_model(model).config
    if task_type is None:
        task_type = "regression" if getattr(bare_config, "num_labels", 2) == 1 else "classification"
    batches = plan_batches(_token_lengths(tokenizer, texts), accelerator.num_processes,
                           accelerator.process_index, cfg.batch_size)
    local: list[tuple[int, Any]] = []
    old_pad_id = getattr(bare_config, "pad_token_id", None)
    with _padding(tokenizer, tokenizer.padding_side), _eval_mode(model):
        if old_pad_id is None:  # the model finds each row's last real token through pad_token_id
            bare_config.pad_token_id = tokenizer.pad_token_id
        try:
            for batch in batches:
                enc = tokenizer([texts[i] for i in batch] or [texts[0]], return_tensors="pt",
                                padding=True).to(accelerator.device)
                with _unwrapped(model, accelerator) as bare:
                    logits = bare(**enc).logits.float()
                values = logits[:, 0].tolist() if task_type == "regression" else logits.argmax(-1).tolist()
                local.extend(zip(batch, values))
        finally:
            bare_config.pad_token_id = old_pad_id
    return _gather(local, n, accelerator)


def eval_loss(model: torch.nn.Module, batches: Iterable[dict], accelerator: Any,
              chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS) -> dict[str, float]:
    """Token-summed causal-LM loss over this process's `batches`, reduced across processes.

    Each batch holds input_ids, attention_mask and labels (IGNORE_INDEX where no loss is taken).
    Every process must pass the same number of batches (a prepared DataLoader does), because
    forward passes under ZeRO-3 are collective. The head's logits are computed `chunk_tokens` at a time
    where the model allows it (None: for the whole batch). Returns eval_loss, perplexity and tokens.
    """
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with _eval_mode(model):
        chunked = chunked_loss_for(accelerator.unwrap_model(model), "causal_lm", chunk_tokens,
                                   agree_on_max(accelerator))
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            if chunked is not None:
                total += chunked(model, batch, labels).sum().double()
            else:
                logits = model(**batch).logits[:, :-1].float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").double()
            count += (labels[:, 1:] != IGNORE_INDEX).sum().double()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    result = loss_and_perplexity(total.item(), int(count.item()))
    result["tokens"] = int(count.item())
    return result


def reference_loss_batches(tokenizer: Any, prompts: Sequence[str], references: Sequence[str],
                           accelerator: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This process's batches of prompt+reference sequences with the loss on the reference (and EOS) only.

    Short shards get a batch whose labels are all IGNORE_INDEX: it runs the forward pass but adds nothing.
    """
    bos = tokenizer(list(prompts))["input_ids"]
    ref_ids = tokenizer(list(references), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    seqs = [(p + r + eos, [IGNORE_INDEX] * len(p) + r + eos) for p, r in zip(bos, ref_ids)]
    plan = plan_batches([len(s[0]) for s in seqs], accelerator.num_processes, accelerator.process_index,
                        batch_size)
    out = []
    for batch in plan:
        rows = [seqs[i] for i in batch] or [(seqs[0][0], [IGNORE_INDEX] * len(seqs[0][0]))]
        width = max(len(ids) for ids, _ in rows)
        out.append({  # right padding: positions then match an unpadded forward pass
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows]),
        })
    return out
