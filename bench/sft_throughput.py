"""Training throughput of the engine against TRL's SFTTrainer and a plain PyTorch loop, same model and data.

    python bench/sft_throughput.py [--steps 10] [--warmup 3] [--rounds 2] [--threads 2]
    python bench/sft_throughput.py --lengths variable [--model small|100m] [--median 150] [--cap 512]
    python bench/sft_throughput.py --smoke      # both modes, every variant once at tiny sizes; targets not checked

--lengths fixed (the default): a randomly initialised 4.2M-parameter fp32 Llama (hidden 256, 4 layers, vocab
2000; --model picks another) and rows of exactly 256 tokens, trained batch 16 x 256 with AdamW through
  engine:   SFTRun(config).build().train(), one process, the path of `dft train`, its defaults;
  trl:      trl.SFTTrainer on the pre-tokenised rows as a user runs it: use_cpu and SFTConfig's defaults for
            precision and memory (bf16 autocast, activation checkpointing), no eval, no saving, logging off;
  trl_fp32: the same SFTTrainer forced to the engine's computation (fp32, no activation checkpointing): a
            like-for-like diagnostic that separates TRL's defaults from its per-step overhead; no target;
  plain:    model(input_ids, labels=input_ids).loss.backward(); AdamW step; zero_grad.
A run's throughput is 4096 tokens over its median step time after `--warmup` steps.
Exits 1 when engine < 1.5x trl or engine < 1.0x plain.

--lengths variable: rows of lognormal lengths (median --median, log-space sigma --sigma, clipped to
[--min-length, --cap]; each row ends in EOS), generated deterministically; every variant trains the same
rows in the same order, --batch-size rows per step, AdamW, fp32 unless said:
  engine:       SFTRun at its defaults (padding-free rows, chunked loss), rows read as `format: text`;
  engine_limit: the engine on rows all of the mean length, the same tokens per step: no spread at all;
  trl:          SFTTrainer at its defaults (padded batches, bf16 autocast: emulated on a CPU without bf16,
                activation checkpointing);
  trl_best:     SFTTrainer at its fastest settings here: padding_free (no padding), bf16 only where the CPU
                has it, no activation checkpointing (no liger kernels: they need a GPU);
  plain:        a padded loop: each batch padded to its longest row, attention mask, labels -100 on padding.
Throughput is USEFUL (non-padding) tokens/s: the mean real tokens of the timed steps over the median step
time. Also reported: each variant's CPU utilisation, 6 x parameters x useful tokens/s over this machine's
measured matmul peak (F.linear 2048^3) in fp32 and in bf16. Exits 1 when engine < 0.85x engine_limit,
engine < 2x trl_best or engine < 2x plain. TRL's default takes over a minute a step on the small model here
(its bf16 backward runs through torch's emulated bf16 matmul), so this mode defaults to 6 timed steps after
2 warm-up and 1 round; with --model 100m (134M parameters) to 3 after 1, and without `trl` (most of an
hour a step; --variants adds it back).

Each variant runs in its own fresh process, one after the other, `--rounds` times alternating (start-up,
model loading and data preparation excluded); the reported figure is the median over rounds. Prints
tokens/s, the ratios and the machine load; writes bench/results/sft_throughput-*.json (variable mode:
sft_throughput-variable-*.json). Exits 1 when a run did not train sanely (fewer steps than asked, a
non-finite loss, other rows than the generated ones). --smoke: a 0.15M-parameter Llama, 1 warm-up + 1 timed
step of batch 2 (fixed: 2 x 32 tokens; variable: lengths median 12, cap 32), 1 round, fixed and variable
modes, every variant, two workers at a time (--jobs); only the sanity checks decide its exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LLAMA_100M, REPO, SMALL_LLAMA, SPECIAL_TOKENS, TINY_LLAMA, Sanity,  # noqa: E402
                          build_llama, count_llama_parameters, eos_rows, exit_status, lognormal_lengths, machine_load,
                          matmul_peak, median, native_bf16, parse_args, run_worker, synthetic_rows, versions,
                          write_results, write_text_jsonl, write_words_jsonl)

BATCH, SEQ_LEN, LR = 16, 256, 1e-4  # the benchmark's batch (--batch-size) and fixed row length (--seq-len)
MODELS = {"tiny": TINY_LLAMA, "small": SMALL_LLAMA, "100m": LLAMA_100M}
# --steps, --warmup, --rounds, --timeout when not given, per mode and model. Variable mode: TRL's default
# (emulated bf16, padded) takes over a minute a step on the small model here; the 100M model takes from half
# a minute to over two minutes a step in fp32
DEFAULTS = {("fixed", "tiny"): (10, 3, 2, 900), ("fixed", "small"): (10, 3, 2, 900),
            ("fixed", "100m"): (3, 1, 1, 3600), ("variable", "tiny"): (6, 2, 1, 3600),
            ("variable", "small"): (6, 2, 1, 3600), ("variable", "100m"): (3, 1, 1, 7200)}
SMOKE = {"steps": 1, "warmup": 1, "rounds": 1, "rows": 8, "batch_size": 2, "seq_len": 32, "threads": 1,
         "timeout": 300, "model": "tiny", "lengths": "both", "median": 12, "cap": 32, "peak_size": 256, "jobs": 2}
FIXED_VARIANTS = ("engine", "trl", "trl_fp32", "plain")
FIXED_TARGETS = {"trl": 1.5, "plain": 1.0}  # engine tokens/s must reach this multiple of each
VARIABLE_VARIANTS = ("engine", "engine_limit", "trl", "trl_best", "plain")
# the 100M model leaves out TRL's default by default: its emulated bf16 backward (torch's bf16 matmul without
# avx512_bf16) would take most of an hour a step; --variants adds it back
DEFAULT_VARIANTS = {("variable", "100m"): ("engine", "engine_limit", "trl_best", "plain")}
# ratio -> (numerator, denominator) variants, and the targets the ratios must reach
VARIABLE_RATIOS = {"engine/trl_best": ("engine", "trl_best"), "engine/trl_default": ("engine", "trl"),
                   "engine/plain": ("engine", "plain"), "engine/limit": ("engine", "engine_limit")}
VARIABLE_TARGETS = {"engine/limit": 0.85, "engine/trl_best": 2.0, "engine/plain": 2.0}
ENGINE_SEED = 42  # training.seed's default: the engine's sampler order, which every variable-mode loop follows
ROW_MARK = "SFT_BENCH_RESULT "


def engine_training(args) -> dict:
    """--engine-set KEY=VALUE pairs as `training` settings, values read as YAML (no, 1024, true)."""
    import yaml

    pairs = [item.partition("=") for item in args.engine_set]
    bad = [key for key, eq, _ in pairs if not eq]
    if bad:
        raise SystemExit(f"--engine-set takes KEY=VALUE, got {bad[0]!r}")
    return {key: yaml.safe_load(value) for key, _, value in pairs}


# ---- workers: each runs in its own process and prints one JSON line -------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _read(work: Path, name: str):
    return json.loads((work / name).read_text())


def run_engine(work: Path, spec: dict, limit: bool = False) -> dict:
    """The engine, as `dft train` runs it. Fixed mode: rows of seq_len tokens. Variable mode: the generated
    rows (engine_limit: the rows of the mean length), checked to reach the engine token for token and to be
    drawn in the order the other loops train them."""
    import yaml

    from distributed_ft.recipes.sft import SFTRun

    _set_threads(spec["threads"])
    steps, batch = spec["steps"], spec["batch_size"]
    variable = spec["mode"] == "variable"
    data = spec["limit" if limit else "rows"] if variable else None
    stamps: list[float] = []
    computed: list[int | None] = []
    config = {
        "model": {"name_or_path": str(work / "model")},
        "data": {"train": [{"path": str(work / (data["text"] if variable else "train.jsonl")), "format": "text"}],
                 "max_length": spec["max_length"], "loss_on": "all"},
        "strategy": {"name": "full"},
        "training": {"max_steps": steps, "micro_batch_size": batch, "learning_rate": LR, "optimizer": "adamw",
                     "lr_scheduler": "constant", "warmup_steps": 0, **spec.get("engine_training", {})},
        "logging": {"log_every": 10 ** 6, "progress_bar": False},
        "eval": {"enabled": False},
        "output": {"dir": str(work / ("engine-limit-run" if limit else "engine-run")), "overwrite": True},
    }
    (work / ("engine-limit.yaml" if limit else "engine.yaml")).write_text(yaml.safe_dump(config))
    run = SFTRun(str(work / ("engine-limit.yaml" if limit else "engine.yaml"))).build()
    if variable:
        pool = _read(work, data["pool"])
        if [ex["input_ids"] for ex in run.data.train] != pool:
            got = sorted(len(ex["input_ids"]) for ex in run.data.train)
            raise SystemExit(f"the engine's rows are not the generated ones: {len(run.data.train)} rows of lengths "
                             f"{got[:5]}...{got[-5:]}, expected {len(pool)} rows of {sorted(map(len, pool))[:5]}...")
        # train() draws from a fresh sampler of this seed: draw the same batches here and compare
        probe = run.data.sampler(run.config.training.seed)
        draws = [i for _ in range(steps) for i in probe.next_indices(batch)]
        if draws != data["draws"][:steps * batch]:
            raise SystemExit(f"the engine draws rows {draws[:8]}..., the other loops train {data['draws'][:8]}...")
    else:
        lengths = {len(ex["input_ids"]) for ex in run.data.train}
        if lengths != {spec["seq_len"]}:
            raise SystemExit(f"engine rows are not all {spec['seq_len']} tokens: lengths {sorted(lengths)[:5]}")
    training = run.config.training
    settings = {key: getattr(training, key, None)
                for key in ("padding_free", "length_grouping", "loss_chunk_tokens", "mixed_precision", "fused_optimizer",
                            "max_grad_norm")}
    settings["mixed_precision_used"] = str(run.accelerator.mixed_precision)
    run.prepare()
    engine_on_step = run.trainer.on_step

    def on_step(step):  # the time each step ended, after everything the engine does per step
        if engine_on_step is not None:
            engine_on_step(step)
        stamps.append(time.perf_counter())
        computed.append(getattr(run.trainer, "computed_tokens", None))  # tokens its passes computed, padding too

    run.trainer.on_step = on_step
    start = time.perf_counter()
    try:
        result = run.train()
    finally:
        run.close()
    return {"start": start, "stamps": stamps, "tokens_per_step": batch * spec["seq_len"] if not variable else None,
            "losses": result.losses, "computed_tokens": computed, "settings": settings}


def run_trl(work: Path, spec: dict, variant: str) -> dict:
    """trl.SFTTrainer on pre-tokenised rows. Fixed mode: `trl` at its defaults, `trl_fp32` without bf16 and
    activation checkpointing, rows drawn at random. Variable mode: the rows in the engine's order
    (sequential sampler), `trl` at its defaults (padded batches), `trl_best` padding-free, without emulated
    bf16 and without activation checkpointing."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    _set_threads(spec["threads"])
    steps, batch = spec["steps"], spec["batch_size"]
    variable = spec["mode"] == "variable"
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    if variable:
        pool = _read(work, spec["rows"]["pool"])
        rows = [pool[i] for i in spec["rows"]["draws"][:steps * batch]]
    else:
        rows = _read(work, "rows.json")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    if variant == "trl_fp32":
        # SFTConfig's defaults are bf16 autocast and activation checkpointing; trl_fp32 turns them off to run
        # the engine's computation.
        options = {"bf16": False, "fp16": False, "activation_checkpointing": False}
    elif variant == "trl_best":
        # padding-free: each batch flattened into one sequence (no padding; max_length must be None without
        # packing, the rows are already within the cap); bf16 only where it is native; no recomputation
        options = {"padding_free": True, "max_length": None, "bf16": spec["native_bf16"], "fp16": False,
                   "activation_checkpointing": False}
    else:
        options = {}
    args = SFTConfig(output_dir=str(work / f"{variant}-run"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                     weight_decay=0.0, max_grad_norm=1.0, packing=False, use_cpu=True,
                     **({"max_length": spec["max_length"]} | options),
                     **({"train_sampling_strategy": "sequential"} if variable else {}),
                     logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", report_to=[],
                     disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer, callbacks=[Stamp()])
    if variable:
        if trainer.train_dataset["input_ids"] != rows:
            raise SystemExit(f"{variant}: TRL's prepared rows differ from the generated ones")
    else:
        lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
        if lengths != {spec["seq_len"]}:
            raise SystemExit(f"TRL rows are not all {spec['seq_len']} tokens: lengths {sorted(lengths)[:5]}")
    batches: list[list[int]] = []  # the row lengths of every batch TRL collated, in order
    collator = trainer.data_collator

    def recording_collator(examples):
        batches.append([len(ex["input_ids"]) for ex in examples])
        return collator(examples)

    trainer.data_collator = recording_collator
    start = time.perf_counter()
    out = trainer.train()
    # TRL counts the tokens it trained on (padding excluded); they must equal the rows'.
    expected = sum(map(len, rows)) if variable else steps * batch * spec["seq_len"]
    if trainer._total_train_tokens != expected:
        raise SystemExit(f"{variant}: TRL trained {trainer._total_train_tokens} tokens, expected {expected}")
    ran = trainer.args
    settings = {"bf16": ran.bf16, "fp16": ran.fp16, "activation_checkpointing": ran.activation_checkpointing,
                "padding_free": ran.padding_free, "packing": ran.packing, "max_length": ran.max_length,
                "use_liger_kernel": ran.use_liger_kernel, "pad_to_multiple_of": ran.pad_to_multiple_of,
                "train_sampling_strategy": ran.train_sampling_strategy,
                "attn_implementation": model.config._attn_implementation,
                "loss": "TRL's fused LM head (log-probs in chunks, always on in SFTTrainer)",
                "native_bf16_cpu": spec["native_bf16"]}
    return {"start": start, "stamps": stamps, "tokens_per_step": None if variable else batch * spec["seq_len"],
            "losses": [out.training_loss], "batch_lengths": batches[:steps], "settings": settings}


def run_plain(work: Path, spec: dict) -> dict:
    """Fixed mode: model(input_ids, labels=input_ids) on random rows. Variable mode: the rows in the engine's
    order, each batch padded to its longest row, attention mask, labels -100 on the padding."""
    import torch
    from transformers import AutoModelForCausalLM

    _set_threads(spec["threads"])
    torch.manual_seed(42)
    steps, batch = spec["steps"], spec["batch_size"]
    variable = spec["mode"] == "variable"
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    if variable:
        pool = _read(work, spec["rows"]["pool"])
        order = spec["rows"]["draws"]
        pad_id = model.config.pad_token_id

        def next_batch(step):
            rows = [pool[i] for i in order[step * batch:(step + 1) * batch]]
            longest = max(map(len, rows))
            ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    else:
        rows = torch.tensor(_read(work, "rows.json"), dtype=torch.long)
        generator = torch.Generator().manual_seed(42)

        def next_batch(step):
            ids = rows[torch.randint(len(rows), (batch,), generator=generator)]
            return {"input_ids": ids, "labels": ids}
    stamps, losses = [], []
    start = time.perf_counter()
    for step in range(steps):
        loss = model(**next_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "tokens_per_step": None if variable else batch * spec["seq_len"],
            "losses": losses}


WORKERS = {"engine": run_engine, "engine_limit": lambda work, spec: run_engine(work, spec, limit=True),
           "trl": lambda work, spec: run_trl(work, spec, "trl"),
           "trl_fp32": lambda work, spec: run_trl(work, spec, "trl_fp32"),
           "trl_best": lambda work, spec: run_trl(work, spec, "trl_best"), "plain": run_plain}


# ---- orchestration ------------------------------------------------------------------------------------------

def steady_state(result: dict, warmup: int, step_tokens: list[int] | None = None) -> dict:
    """Tokens/s over the steps after `warmup`: the (mean real) tokens of a timed step over the median step
    time, and total tokens over total time for reference. `step_tokens`: the real tokens of every step,
    when they vary (variable mode); otherwise the run's fixed tokens_per_step."""
    stamps = [result["start"]] + result["stamps"]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    if not intervals:
        raise SystemExit("no steps left after warm-up; raise --steps")
    if step_tokens is None:
        timed = [result["tokens_per_step"]] * len(intervals)
    else:
        timed = step_tokens[warmup:warmup + len(intervals)]
    tokens = sum(timed) / len(timed)
    return {"steps_run": len(result["stamps"]), "steps_timed": len(intervals), "median_step_s": median(intervals),
            "tokens_per_s": tokens / median(intervals), "tokens_per_s_mean": sum(timed) / sum(intervals),
            "losses": result["losses"]}


def check_run(sanity: Sanity, variant: str, measured: dict, args) -> None:
    """A run must have trained every step it was asked for, with finite losses and a positive rate."""
    name = f"{variant} round {measured['round']}"
    sanity.check(measured["steps_run"] == args.warmup + args.steps,
                 f"{name}: {measured['steps_run']} steps ran, expected {args.warmup + args.steps}")
    sanity.all_finite(f"{name}: losses", measured["losses"])
    sanity.finite(f"{name}: tokens/s", measured["tokens_per_s"], positive=True)


def launch_worker(variant: str, work: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(key, None)  # one plain process, whatever the calling shell holds
    cmd = [sys.executable, __file__, "--worker", variant, "--work", str(work)]
    return run_worker(cmd, env, args.timeout, variant, ROW_MARK)


def mode_args(args, mode: str, all_variants: tuple[str, ...]) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """`args` with this mode's defaults filled in where not given, and the variants it runs."""
    args = argparse.Namespace(**vars(args))
    for key, value in zip(("steps", "warmup", "rounds", "timeout"), DEFAULTS[(mode, args.model)]):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants:
        asked = {"engine", *args.variants.split(",")}
        unknown = asked - set(FIXED_VARIANTS) - set(VARIABLE_VARIANTS)
        if unknown:
            raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from "
                             f"{sorted(set(FIXED_VARIANTS) | set(VARIABLE_VARIANTS))}")
        variants = tuple(v for v in all_variants if v in asked)
    else:
        variants = DEFAULT_VARIANTS.get((mode, args.model), all_variants)
    return args, variants


class FixedMode:
    """Rows of exactly --seq-len tokens: engine vs trl (defaults), trl_fp32 and plain."""
    name = "fixed"

    def __init__(self, work: Path, args, arch: dict):
        args, self.variants = mode_args(args, self.name, FIXED_VARIANTS)
        self.work, self.args, self.arch = work, args, arch
        build_llama(work / "model", max_position_embeddings=args.seq_len * 2, **arch)
        rows = synthetic_rows(args.rows, args.seq_len, arch["vocab_size"])
        (work / "rows.json").write_text(json.dumps(rows))
        write_text_jsonl(work / "train.jsonl", rows)
        spec = {"mode": "fixed", "steps": args.warmup + args.steps, "threads": args.threads,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "max_length": args.seq_len,
                "native_bf16": native_bf16(), "engine_training": engine_training(args)}
        (work / "spec.json").write_text(json.dumps(spec))

    def measure(self, variant: str, result: dict) -> dict:
        return steady_state(result, self.args.warmup)

    def report(self, sanity: Sanity, runs: dict, extra: dict) -> bool:
        args, arch = self.args, self.arch
        tps = {v: median([m["tokens_per_s"] for m in measured]) for v, measured in runs.items()}
        ratios = {f"engine/{v}": tps["engine"] / tps[v] for v in tps if v != "engine"}
        ok = {f"engine/{v}": ratios[f"engine/{v}"] >= target for v, target in FIXED_TARGETS.items() if v in tps}
        params = count_llama_parameters(**arch)
        print(f"\n{'SMOKE RUN (tiny sizes, targets not checked): ' if args.smoke else ''}"
              f"fixed lengths: model {params / 1e6:.2f}M parameters fp32, batch {args.batch_size} x {args.seq_len} "
              f"tokens, AdamW, {args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, median "
              f"of {args.rounds}")
        for v in tps:
            print(f"  {v:>8}: {tps[v]:9.0f} tokens/s")
        for v, target in FIXED_TARGETS.items():
            name = f"engine/{v}"
            if name not in ratios:
                print(f"  {name:>12}: not run (target >= {target}x not checked)")
                continue
            verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok[name] else "MISSED")
            print(f"  {name:>12}: {ratios[name]:.2f}x  (target >= {target}x: {verdict})")
        if "engine/trl_fp32" in ratios:
            print(f"  engine/trl_fp32: {ratios['engine/trl_fp32']:.2f}x  (TRL forced to fp32 without activation "
                  f"checkpointing: like for like, no target)")
        print(f"  load average (1m) {extra['load_before']['loadavg_1m']} before, "
              f"{extra['load_after']['loadavg_1m']} after, {extra['load_after']['cpus']} cpus")
        path = write_results("sft_throughput", {
            "model": {**arch, "name": args.model, "parameters": params, "dtype": "fp32"},
            "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens_per_step": args.batch_size * args.seq_len,
            "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "tokens_per_s": tps, "ratios": ratios,
            "targets": FIXED_TARGETS, "targets_met": ok, "runs": runs, "load_before": extra["load_before"],
            "load_after": extra["load_after"], "sanity_failures": sanity.failures, "versions": versions()},
            smoke=args.smoke)
        print(f"  results: {path.relative_to(REPO)}")
        return all(ok.values())


class VariableMode:
    """Rows of lognormal lengths: useful tokens/s of engine, engine_limit, trl, trl_best and plain."""
    name = "variable"

    def __init__(self, work: Path, args, arch: dict):
        from distributed_ft.data import WeightedMixSampler  # the engine's sampler: its draws are the row order

        args, self.variants = mode_args(args, self.name, VARIABLE_VARIANTS)
        self.work, self.args, self.arch = work, args, arch
        if args.min_length < 2:
            raise SystemExit("--min-length must be at least 2 (a row is words plus EOS)")
        build_llama(work / "model", max_position_embeddings=args.cap * 2, **arch)
        eos_id = SPECIAL_TOKENS.index("</s>")
        lengths = lognormal_lengths(args.rows, args.median, args.cap, sigma=args.sigma, minimum=args.min_length)
        pool = eos_rows(lengths, arch["vocab_size"], eos_id)
        steps, batch = args.warmup + args.steps, args.batch_size
        draws = WeightedMixSampler([len(pool)], [1.0], ENGINE_SEED).next_indices(steps * batch)
        self.step_tokens = [sum(len(pool[i]) for i in draws[s * batch:(s + 1) * batch]) for s in range(steps)]
        self.step_padded = [batch * max(len(pool[i]) for i in draws[s * batch:(s + 1) * batch]) for s in range(steps)]
        self.step_lengths = [[len(pool[i]) for i in draws[s * batch:(s + 1) * batch]] for s in range(steps)]
        # engine_limit: every row of the mean length of the rows trained, so a step has the same tokens on average
        self.mean_length = max(2, round(sum(self.step_tokens) / (steps * batch)))
        limit_pool = eos_rows([self.mean_length] * len(pool), arch["vocab_size"], eos_id, seed=1)
        for name, rows in (("rows", pool), ("limit", limit_pool)):
            (work / f"{name}.json").write_text(json.dumps(rows))
            write_words_jsonl(work / f"{name}.jsonl", rows)
        spec = {"mode": "variable", "steps": steps, "threads": args.threads, "batch_size": batch,
                "max_length": args.cap, "native_bf16": native_bf16(), "engine_training": engine_training(args),
                "rows": {"pool": "rows.json", "text": "rows.jsonl", "draws": draws},
                "limit": {"pool": "limit.json", "text": "limit.jsonl", "draws": draws}}
        (work / "spec.json").write_text(json.dumps(spec))
        timed = slice(args.warmup, steps)
        all_lengths = [n for step in self.step_lengths for n in step]
        self.data = {"distribution": "lognormal", "median": args.median, "sigma": args.sigma, "cap": args.cap,
                     "min_length": args.min_length, "pool_rows": len(pool), "rows_trained": len(draws),
                     "mean_length": sum(all_lengths) / len(all_lengths), "median_length": median(all_lengths),
                     "max_length": max(all_lengths), "min_length_seen": min(all_lengths),
                     "at_cap": sum(n == args.cap for n in all_lengths), "limit_row_length": self.mean_length,
                     "real_tokens_per_step": self.step_tokens, "padded_tokens_per_step": self.step_padded,
                     "mean_real_tokens_timed": sum(self.step_tokens[timed]) / len(self.step_tokens[timed]),
                     "mean_padded_tokens_timed": sum(self.step_padded[timed]) / len(self.step_padded[timed])}

    def measure(self, variant: str, result: dict) -> dict:
        steps = self.args.warmup + self.args.steps
        tokens = [self.args.batch_size * self.mean_length] * steps if variant == "engine_limit" else self.step_tokens
        measured = steady_state(result, self.args.warmup, tokens)
        if "settings" in result:
            measured["settings"] = result["settings"]
        if variant == "engine" and any(c is not None for c in result.get("computed_tokens", [])):
            measured["computed_tokens_per_step"] = result["computed_tokens"]
        if "batch_lengths" in result:
            measured["batches_match"] = result["batch_lengths"] == self.step_lengths
        if variant == "plain":
            measured["computed_tokens_per_step"] = self.step_padded
        return measured

    def check(self, sanity: Sanity, variant: str, measured: dict) -> None:
        name = f"{variant} round {measured['round']}"
        if "batches_match" in measured:
            sanity.check(measured["batches_match"], f"{name}: TRL's batches are not the engine's rows in its order")
        if variant == "engine" and "computed_tokens_per_step" in measured:
            computed = measured["computed_tokens_per_step"]
            sanity.check(all(c is None or c >= t for c, t in zip(computed, self.step_tokens)),
                         f"{name}: the engine computed fewer tokens than the rows hold: {computed[:4]} vs "
                         f"{self.step_tokens[:4]}")

    def report(self, sanity: Sanity, runs: dict, extra: dict) -> bool:
        args, arch, data = self.args, self.arch, self.data
        tps = {v: median([m["tokens_per_s"] for m in measured]) for v, measured in runs.items()}
        ratios = {name: tps[a] / tps[b] if a in tps and b in tps else None for name, (a, b) in VARIABLE_RATIOS.items()}
        ok = {name: ratios[name] >= target for name, target in VARIABLE_TARGETS.items() if ratios[name] is not None}
        params = count_llama_parameters(**arch)
        peak = extra["peak"]
        utilisation = {v: {"fp32": 6 * params * tps[v] / peak["fp32_flops"],
                           "bf16": 6 * params * tps[v] / peak["bf16_flops"]} for v in tps}
        print(f"\n{'SMOKE RUN (tiny sizes, targets not checked): ' if args.smoke else ''}"
              f"variable lengths: model '{args.model}' {params / 1e6:.2f}M parameters fp32, {args.batch_size} rows "
              f"per step, AdamW, {args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up, "
              f"median of {args.rounds}")
        print(f"  rows: lognormal median {args.median}, sigma {args.sigma}, in [{args.min_length}, {args.cap}]: "
              f"mean {data['mean_length']:.1f} tokens, median {data['median_length']}, longest {data['max_length']}, "
              f"{data['at_cap']} of {data['rows_trained']} at the cap; timed steps hold "
              f"{data['mean_real_tokens_timed']:.0f} real tokens on average, "
              f"{data['mean_padded_tokens_timed']:.0f} padded to their longest row "
              f"({data['mean_real_tokens_timed'] / data['mean_padded_tokens_timed']:.0%} useful); engine_limit rows "
              f"of {self.mean_length} tokens")
        print(f"  matmul peak (F.linear {peak['size']}^3, {peak['threads']} threads): fp32 "
              f"{peak['fp32_flops'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16_flops'] / 1e9:.1f} GFLOP/s "
              f"(CPU native bf16: {native_bf16()})")
        print(f"  {'variant':>12}  {'useful tok/s':>12}  {'median step':>11}  {'util fp32':>9}  {'util bf16':>9}")
        for v in tps:
            step = median([m["median_step_s"] for m in runs[v]])
            print(f"  {v:>12}  {tps[v]:12.0f}  {step * 1000:9.0f}ms  {utilisation[v]['fp32']:9.1%}  "
                  f"{utilisation[v]['bf16']:9.1%}")
        for v in ("trl", "trl_best"):
            if v not in runs:
                print(f"  {v}: not run")
                continue
            s = runs[v][0].get("settings", {})
            print(f"  {v} ran: bf16 {s.get('bf16')}, activation checkpointing {s.get('activation_checkpointing')}, "
                  f"padding_free {s.get('padding_free')}, packing {s.get('packing')}, max_length "
                  f"{s.get('max_length')}, liger {s.get('use_liger_kernel')}, attention {s.get('attn_implementation')}")
        engine_settings = runs["engine"][0].get("settings", {})
        computed = runs["engine"][0].get("computed_tokens_per_step")
        if computed and all(c is not None for c in computed):
            timed = computed[args.warmup:]
            print(f"  engine ran: {engine_settings}; its passes computed {sum(timed) / len(timed):.0f} tokens per "
                  f"timed step ({data['mean_real_tokens_timed'] * len(timed) / sum(timed):.0%} useful)")
        else:
            print(f"  engine ran: {engine_settings}")
        for name, value in ratios.items():
            target = VARIABLE_TARGETS.get(name)
            if value is None:
                print(f"  {name:>18}: not run" + (f" (target >= {target}x not checked)" if target else ""))
            elif target is None:
                print(f"  {name:>18}: {value:.2f}x  (no target)")
            else:
                verdict = "not checked in a smoke run" if args.smoke else ("ok" if ok[name] else "MISSED")
                print(f"  {name:>18}: {value:.2f}x  (target >= {target}x: {verdict})")
        print(f"  load average (1m) {extra['load_before']['loadavg_1m']} before, "
              f"{extra['load_after']['loadavg_1m']} after, {extra['load_after']['cpus']} cpus")
        path = write_results("sft_throughput-variable", {
            "model": {**arch, "name": args.model, "parameters": params, "dtype": "fp32"},
            "batch_size": args.batch_size, "data": data, "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "useful_tokens_per_s": tps, "ratios": ratios,
            "targets": VARIABLE_TARGETS, "targets_met": ok, "matmul_peak": peak, "native_bf16": native_bf16(),
            "cpu_utilisation": utilisation, "runs": runs, "load_before": extra["load_before"],
            "load_after": extra["load_after"], "sanity_failures": sanity.failures, "versions": versions()},
            smoke=args.smoke)
        print(f"  results: {path.relative_to(REPO)}")
        return all(ok.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", choices=["fixed", "variable", "both"], default="fixed",
                        help="rows of exactly --seq-len tokens, of lognormal lengths, or both benchmarks in turn")
    parser.add_argument("--model", choices=sorted(MODELS), default="small",
                        help="small: 4.2M-parameter Llama; 100m: hidden 768, 12 layers, vocab 32000 (134M)")
    parser.add_argument("--steps", type=int, help="timed steps per run, after the warm-up (fixed 10, variable 6; "
                                                  "100m: 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps at the start of each run (fixed 3, variable 2; "
                                                   "100m: 1)")
    parser.add_argument("--rounds", type=int, help="runs of each variant, alternating (fixed 2, variable 1; 100m: 1)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per run")
    parser.add_argument("--rows", type=int, default=256, help="distinct training rows")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="rows per optimizer step")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per row (fixed mode)")
    parser.add_argument("--median", type=float, default=150, help="median row length (variable mode)")
    parser.add_argument("--sigma", type=float, default=0.8, help="lognormal spread of the row lengths (log space)")
    parser.add_argument("--cap", type=int, default=512, help="longest row (variable mode)")
    parser.add_argument("--min-length", type=int, default=8, help="shortest row (variable mode)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the measured peak")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workers at once; above 1 they share the cores, so only for smoke runs")
    parser.add_argument("--variants", help="comma-separated variants to run (engine always; default: all of the "
                                           "mode's, for the 100m model in variable mode all but trl)")
    parser.add_argument("--timeout", type=int, help="seconds allowed per run (fixed: 900, 100m 3600; variable: "
                                                    "3600, 100m 7200)")
    parser.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `training` setting for the engine's runs instead of its default (repeatable), e.g. "
                             "--engine-set mixed_precision=no to measure one lever")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)

    if args.worker:
        result = WORKERS[args.worker](args.work, _read(args.work, "spec.json"))
        print(ROW_MARK + json.dumps(result), flush=True)
        return 0

    arch = MODELS[args.model]
    modes = {"fixed": [FixedMode], "variable": [VariableMode], "both": [FixedMode, VariableMode]}[args.lengths]
    sanity = Sanity()
    met = []
    with tempfile.TemporaryDirectory(prefix="dft-sft-bench-") as tmp:
        benches = []
        for mode in modes:
            (Path(tmp) / mode.name).mkdir()
            benches.append(mode(Path(tmp) / mode.name, args, arch))
        peak = None
        if any(isinstance(b, VariableMode) for b in benches):
            peak = matmul_peak(args.peak_size, args.threads, repeats=1 if args.smoke else 3)
        load_before = machine_load()
        # every run: (bench, round, variant), rounds alternating in order so drift in load hits all alike
        tasks = [(b, r, v) for b in benches for r in range(b.args.rounds)
                 for v in (b.variants if r % 2 == 0 else b.variants[::-1])]
        runs = {id(b): {v: [] for v in b.variants} for b in benches}

        def one(task):
            bench, r, variant = task
            return bench.measure(variant, launch_worker(variant, bench.work, bench.args))

        pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
        futures = [pool.submit(one, task) for task in tasks]
        try:
            for (bench, r, variant), future in zip(tasks, futures):
                measured = {"round": r + 1, **future.result()}
                check_run(sanity, f"{bench.name} {variant}", measured, bench.args)
                if isinstance(bench, VariableMode):
                    bench.check(sanity, variant, measured)
                runs[id(bench)][variant].append(measured)
                print(f"{bench.name} round {r + 1} {variant:>12}: {measured['tokens_per_s']:9.0f} tokens/s "
                      f"(median step {measured['median_step_s'] * 1000:.0f} ms)", flush=True)
        finally:  # a failed run ends the benchmark: start no more (those running finish first)
            pool.shutdown(wait=True, cancel_futures=True)
        load_after = machine_load()
        for bench in benches:
            met.append(bench.report(sanity, runs[id(bench)],
                                    {"load_before": load_before, "load_after": load_after, "peak": peak}))
    return exit_status(sanity, all(met), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
