"""Tokens/s of a pairwise reward-model training step: `dft rm` against TRL's RewardTrainer, same model, pairs,
batch and precision.

    python bench/rm_step.py [--steps 6] [--warmup 2] [--rounds 2] [--pairs 8] [--prompt-len 64]
                            [--completion-len 64] [--threads 1]
    python bench/rm_step.py --smoke       # every variant at tiny sizes; first-step losses checked, no target

The model is bench/common.py's 4.2M-parameter fp32 Llama (hidden 256, 4 layers, vocab 2000) with a one-output
sequence-classification head, saved with its head so that both sides start from the same weights; the pairs
are bench/dpo_step.py's synthetic ones. Each side reads a pair as `dft rm` renders it for the reward grader
(`user: <prompt>` / `assistant: <completion>`, no EOS): dft tokenizes the texts itself, TRL gets those token
ids as its documented pre-tokenised `chosen_ids` / `rejected_ids` columns. Each step is one optimizer step
over `--pairs` pairs (2 x pairs sequences, padded), the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected),
no margin, AdamW at a constant learning rate, gradient clipping 1.0, full fine-tuning, through
  dft:      RMRun(config).build().prepare().train(): the path of `dft rm` (pairwise), fp32 (its sides end to end in
            one padding-free row, training.padding_free);
  dft_bf16: the same with bf16 autocast (training.mixed_precision: bf16);
  trl:      trl.RewardTrainer with a RewardConfig as a user writes it: use_cpu, the same batch, learning rate and
            max_length, RewardConfig's defaults otherwise (bf16 autocast, gradient checkpointing, dropout off);
  trl_fp32: the same with bf16 and gradient checkpointing off: dft's computation, fair for a CPU.
Order of the pairs, timing, token counting (non-padding tokens of chosen + rejected), rounds, peak RSS and
the checks are bench/dpo_step.py's: the first step's loss and mean reward margin must equal trl_fp32's to
1e-5 relative (dft_bf16's trl's within bf16 precision). Target, each at one precision: dft >= 1.2x the
tokens/s of trl_fp32 and dft_bf16 >= 1.2x trl's. Writes
bench/results/rm_step-*.json; exits 1 when a check fails or (full runs) the target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_llama, parse_args  # noqa: E402
from bench.dpo_step import (SMOKE, add_pair_args, make_pairs, pair_sources, run_benchmark,  # noqa: E402
                            sampler_order, train_dft, train_trl, training_sections, trl_common_args, worker_main,
                            write_jsonl)


def build_work(args, work: Path, arch: dict) -> None:
    """The seeded Llama with a seeded one-output score head (saved, not initialised at load), and the pairs."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the load report of the new head is expected
    build_llama(work / "lm", max_position_embeddings=2 * (args.prompt_len + args.completion_len), **arch)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(work / "lm", num_labels=1)
    model.save_pretrained(work / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(work / "lm").save_pretrained(work / "model")
    pairs = make_pairs(args.rows + 2, args.prompt_len, args.completion_len, arch["vocab_size"])
    write_jsonl(work / "train.jsonl", pairs[:args.rows])
    write_jsonl(work / "held.jsonl", pairs[args.rows:])  # see dpo_step.pair_sources


def max_length(args) -> int:
    return args.prompt_len + args.completion_len + 2  # the two role words, no EOS


def rm_tokens(pair: dict) -> int:
    return len(pair["chosen"]) + len(pair["rejected"])


def worker_dft(args, work: Path, precision: str = "no") -> dict:
    import yaml

    from distributed_ft.recipes.rm import RMRun

    config = {**training_sections(args, work, args.warmup + args.steps, precision),
              "pairs": {**pair_sources(work),
                        "max_length": max_length(args)},
              "rm": {"objective": "pairwise", "margin": 0.0}}
    path = work / f"rm-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return train_dft(RMRun(str(path)).build(), rm_tokens, ("margin",))


def worker_trl(args, work: Path, fp32: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from distributed_ft.preference.batches import tokenize_rm_pair
    from distributed_ft.preference.render import reward_text

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    render = lambda prompt, completion: reward_text(tokenizer, prompt, completion)  # noqa: E731
    pairs = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    order = sampler_order(len(pairs), args.pairs, args.warmup + args.steps)
    rows = [tokenize_rm_pair(tokenizer, pairs[i], max_length(args), render) for i in order]
    config = RewardConfig(**trl_common_args(args, work, fp32), max_length=max_length(args))
    trainer = RewardTrainer(model=str(work / "model"), args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"chosen_ids": [r["chosen"] for r in rows],
                                                             "rejected_ids": [r["rejected"] for r in rows]}))
    return train_trl(trainer, {"margin": "margin"})


WORKERS = {"dft": worker_dft, "dft_bf16": lambda args, work: worker_dft(args, work, "bf16"), "trl": worker_trl,
           "trl_fp32": lambda args, work: worker_trl(args, work, fp32=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(parser)
    args = parse_args(parser, SMOKE)
    if args.worker:
        return worker_main(args, WORKERS)
    return run_benchmark("rm_step", __file__, args, build_work, "pairwise reward model (Bradley-Terry, no margin)")


if __name__ == "__main__":
    sys.exit(main())
