"""The `dft` command line: every subcommand in one table (name, help, arguments, function).

Subcommands stay thin: they parse arguments and call a recipe or a library function. A problem with
the user's input is one line on stderr and exit code 2; `DFT_DEBUG=1` adds the traceback behind it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from distributed_ft.errors import ConfigError, DftError, EvalError


# --- training and evaluation --------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")


def _train(args) -> int:
    from distributed_ft.recipes import sft

    return sft.run(args.config, args.overrides)


def _ppo(args) -> int:
    from distributed_ft.recipes import ppo

    return ppo.run(args.config, args.overrides)


def _grpo(args) -> int:
    from distributed_ft.recipes import grpo

    return grpo.run(args.config, args.overrides)


def _dpo(args) -> int:
    from distributed_ft.recipes import dpo

    return dpo.run(args.config, args.overrides)


def _rm(args) -> int:
    from distributed_ft.recipes import rm

    return rm.run(args.config, args.overrides)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from distributed_ft.tasks import KINDS

    p.add_argument("config", nargs="?", help="eval or run config to evaluate (omit with --predictions)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--predictions", metavar="FILE.jsonl",
                   help="JSONL with 'prediction' and 'reference' (optional 'task', 'input') per line")
    p.add_argument("--metrics", help="comma-separated metric names (default: the task type's)")
    p.add_argument("--task-type", default="generation", choices=KINDS)
    p.add_argument("--out", metavar="FILE.json", help="also write the scores as JSON")
    p.add_argument("--no-stemmer", action="store_true", help="ROUGE without the Porter stemmer")
    p.add_argument("--no-normalize", action="store_true", help="exact match on raw strings")


def _eval(args) -> int:
    if args.predictions is None:
        if args.config is None:
            raise EvalError("dft eval needs a run config or --predictions FILE.jsonl")
        from distributed_ft.recipes import evaluate

        return evaluate.run(args.config, args.overrides)
    from distributed_ft.eval.predictions import format_table, score_predictions_file, write_scores

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = score_predictions_file(args.predictions, metrics, args.task_type, rouge_stemmer=not args.no_stemmer,
                                    normalize_exact_match=not args.no_normalize)
    print(format_table(result))
    if result.signatures.get("bleu"):
        print(f"sacrebleu signature: {result.signatures['bleu']}")
    if result.signatures.get("rouge"):
        print(f"rouge signature: {result.signatures['rouge']}")
    if args.out:
        write_scores(result, args.out, args.predictions, args.task_type)
    return 0


# --- data ---------------------------------------------------------------------------------------------------
def _data_inspect_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--samples", type=int, default=3, help="sample chunks shown per documents dataset (default 3)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")


def _data_inspect(args) -> int:
    from distributed_ft.recipes.inspect_data import inspect

    return inspect(args.config, args.overrides, samples=args.samples, as_json=args.json)


# --- configs and strategies ---------------------------------------------------------------------------------
def _config_show(args) -> int:
    import yaml

    from distributed_ft.config import load_any
    from distributed_ft.strict import config_to_dict

    _, config = load_any(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0


def _config_validate(args) -> int:
    from distributed_ft.config import load_any

    kind, _ = load_any(args.config, args.overrides)
    print(f"{args.config}: valid {kind.name} config ({kind.description})")
    return 0


def _strategies(args) -> int:
    from distributed_ft.strategies import registered

    for name, strategy in registered().items():
        print(f"{name:<14} {strategy.description}")
    return 0


# --- the grader service -------------------------------------------------------------------------------------
def _grader_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="grader spec (YAML or JSON)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs DFT_GRADER_TOKEN)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    limits = p.add_argument_group("request limits (refusals are JSON naming the option)")
    limits.add_argument("--max-body-bytes", type=int, default=32 << 20,
                        help="largest request body, chunked ones included (413 beyond; default 32 MiB)")
    limits.add_argument("--max-item-bytes", type=int, default=1 << 20,
                        help="largest JSON of one entry's sample or item (413 naming its index; default 1 MiB)")
    limits.add_argument("--max-concurrent", type=int, default=64,
                        help="requests read or graded at once; more wait --queue-timeout, then 503 (default 64)")
    limits.add_argument("--queue-timeout", type=float, default=10.0, metavar="S",
                        help="how long a request waits for a free slot before 503 + Retry-After (0: at once)")
    limits.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                        help="a request body must arrive within this (408 beyond, against slow clients)")
    limits.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                        help="idle keep-alive connections are closed after this")


def _grader_serve(args) -> int:
    from distributed_ft.grader.server import ServerLimits, serve

    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_item_bytes=args.max_item_bytes,
                          max_concurrent=args.max_concurrent, queue_timeout_s=args.queue_timeout,
                          body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout)
    serve(args.config, host=args.host, port=args.port, log_level=args.log_level, limits=limits)
    return 0


def _grader_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--sample", required=True, help="the model output text")
    p.add_argument("--item", default="{}", help="the dataset row as JSON")


def _grader_check(args) -> int:
    from distributed_ft.grader.engine import grade_entries, load_grader

    try:
        item = json.loads(args.item)
    except ValueError as err:
        raise ConfigError(f"--item is not valid JSON ({err})") from None
    grader = load_grader(args.config)
    try:
        result = grade_entries(grader, [{"sample": {"output_text": args.sample}, "item": item}])[0]
    finally:
        grader.close()
    print(json.dumps(result.to_dict()))
    return 0 if result.reward is not None else 1


def _grader_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="grader spec (YAML or JSON)")
    p.add_argument("--input", required=True, metavar="SAMPLES.jsonl",
                   help="one object per line with 'output' (and the fields the grader's templates read as item.*)")
    p.add_argument("--output", required=True, metavar="GRADED.jsonl", help="the rows with the grader's 'score'")
    p.add_argument("--batch-size", type=int, default=64)


def _grader_label(args) -> int:
    from distributed_ft.preference.graded import label_file

    report = label_file(args.config, args.input, args.output, args.batch_size)
    print(json.dumps({"labelled": report.labelled, "unscorable": report.unscorable,
                      "samples_per_s": report.samples_per_s, "output": args.output}))
    return 0


def _grader_validate(args) -> int:
    from distributed_ft.grader.spec import load_grader_spec

    spec = load_grader_spec(args.config)
    print(json.dumps({"ok": True, "type": spec.type, "name": spec.name}))
    return 0


# --- clusters -----------------------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs in total")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory of one GPU (default 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args) -> int:
    from distributed_ft.cluster.plan import format_plan, plan_as_dict, plan_for_run_config
    from distributed_ft.config import load_config

    plan = plan_for_run_config(load_config(args.config, args.overrides), args.gpus, args.gpu_memory)
    print(json.dumps(plan_as_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0


def _slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value passed to the run")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 for CPU nodes (gloo)")
    p.add_argument("--processes-per-node", type=int, help="default: one per GPU, 1 on CPU nodes")
    p.add_argument("--cpus-per-node", type=int, help="CPUs for each node's ranks (sbatch --cpus-per-task)")
    p.add_argument("--launch", help="accelerate launch config (default launch/zero3.yaml, "
                                    "launch/zero2_cpu.yaml without GPUs)")
    p.add_argument("--kind", choices=("train", "eval", "ppo", "grpo"), default="train")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 02:00:00")
    p.add_argument("--account")
    p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                   help="send USR1 this long before the time limit: checkpoint and stop (default 300)")
    p.add_argument("--requeue", action="store_true",
                   help="requeue the job after a signalled stop; it resumes from the checkpoint")
    p.add_argument("--job-name")
    p.add_argument("--log-dir", default="slurm-logs")
    p.add_argument("--template", help="sbatch template (default slurm/<kind>.sbatch)")
    p.add_argument("-o", "--output", help="where to write the script (default LOG_DIR/JOB_NAME.sbatch)")


# The config kind each Slurm job kind runs.
_SLURM_CONFIG_KINDS = {"train": "sft", "ppo": "ppo", "grpo": "grpo", "eval": ("eval", "sft")}


def _slurm_script(args):
    from distributed_ft.cluster.slurm import JobSpec, write
    from distributed_ft.config import load_config

    spec = JobSpec(config=args.config, overrides=list(args.overrides), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, processes_per_node=args.processes_per_node,
                   cpus_per_node=args.cpus_per_node, launch=args.launch, kind=args.kind, partition=args.partition,
                   time=args.time, account=args.account, signal_lead=args.signal_lead, requeue=args.requeue,
                   job_name=args.job_name, log_dir=args.log_dir, template=args.template)
    # A bad config fails here, not on the cluster.
    return write(spec, args.output,
                 check_config=lambda: load_config(spec.config, spec.overrides, kind=_SLURM_CONFIG_KINDS[spec.kind]))


def _slurm_render(args) -> int:
    print(_slurm_script(args))
    return 0


def _slurm_submit(args) -> int:
    from distributed_ft.cluster.slurm import submit

    path = _slurm_script(args)
    print(f"submitted job {submit(path)} ({path})")
    return 0


# --- export and inference -----------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run directory (its final/) or a model/adapter folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the plain Hugging Face folder to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA/DoRA/IA3 adapter into its base")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights dtype (default: as saved)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload OUT to this Hub repo (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")


def _export(args) -> int:
    from distributed_ft.recipes.export import export

    export(args.source, args.output, merge=args.merge, dtype=args.dtype, overwrite=args.overwrite,
           push_to_hub=args.push_to_hub, public=args.public)
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a run directory, a model/adapter folder or a Hub id")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _sampling(args):
    from distributed_ft.recipes.generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _generate_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    p.add_argument("--prompt", required=True, help="the text to complete")


def _generate(args) -> int:
    from distributed_ft.recipes.generate import generate

    return generate(args.model, args.prompt, _sampling(args))


def _chat(args) -> int:
    from distributed_ft.recipes.generate import chat

    return chat(args.model, _sampling(args))


# --- the table ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    name: str                   # "group sub" for a subcommand of a group
    help: str
    func: Callable | None       # None for a group
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS = [
    Command("train", "fine-tune a model from a run config", _train, _config_args),
    Command("ppo", "PPO fine-tuning against a grader service", _ppo, _config_args),
    Command("grpo", "critic-free RL (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, GSPO) against a grader", _grpo,
            _config_args),
    Command("dpo", "preference optimisation on chosen/rejected pairs (DPO, IPO, hinge, SimPO)", _dpo, _config_args),
    Command("rm", "train a pairwise reward model on chosen/rejected pairs (serves as a score_model grader)", _rm,
            _config_args),
    Command("eval", "evaluate the model of a config, or score a predictions file", _eval, _eval_args),
    Command("data", "see what the data layer builds from a config", None),
    Command("data inspect", "files read and skipped, cleaning, chunks and tokens per task, sample chunks",
            _data_inspect, _data_inspect_args),
    Command("config", "show or validate a config of any kind (run, PPO, GRPO, eval, grader)", None),
    Command("config show", "print the resolved config", _config_show, _config_args),
    Command("config validate", "check a config without running it", _config_validate, _config_args),
    Command("strategies", "list the registered fine-tuning strategies", _strategies),
    Command("grader", "reward grading service for RL fine-tuning", None),
    Command("grader serve", "serve a grader over HTTP", _grader_serve, _grader_serve_args),
    Command("grader check", "grade one sample locally and print the result as JSON", _grader_check,
            _grader_check_args),
    Command("grader label", "score a JSONL of samples with a grader: graded samples to train a grader model",
            _grader_label, _grader_label_args),
    Command("grader validate", "check a grader spec without loading models", _grader_validate,
            lambda p: p.add_argument("--config", required=True)),
    Command("plan", "memory per GPU for each ZeRO stage and offload choice", _plan, _plan_args),
    Command("slurm", "render or submit a multi-node Slurm job for a run config", None),
    Command("slurm render", "write a ready sbatch script", _slurm_render, _slurm_args),
    Command("slurm submit", "render the sbatch script and submit it", _slurm_submit, _slurm_args),
    Command("export", "write a plain Hugging Face folder from a run or a saved model (--merge adapters)", _export,
            _export_args),
    Command("generate", "print the completion of a prompt", _generate, _generate_args),
    Command("chat", "chat with a model on the terminal (streams tokens; Ctrl-D to quit)", _chat, _sampling_args),
]


def build_parser(prog: str = "dft") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune language models on one CPU or many GPUs.")
    groups = {"": parser.add_subparsers(dest="command", required=True)}
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        sub = groups[group].add_parser(name, help=command.help)
        if command.func is None:
            groups[command.name] = sub.add_subparsers(dest=f"{command.name}_command", required=True)
            continue
        if command.arguments is not None:
            command.arguments(sub)
        sub.set_defaults(func=command.func)
    return parser


def main(argv: list[str] | None = None, prog: str = "dft") -> int:
    from distributed_ft.models.quantization import quiet_optional_kernel_notice

    args = build_parser(prog).parse_args(argv)
    quiet_optional_kernel_notice()
    try:
        return int(args.func(args) or 0)
    except DftError as err:
        if os.environ.get("DFT_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """Process entry point of `dft` and `python -m distributed_ft`."""
    from distributed_ft.engine.process_exit import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
