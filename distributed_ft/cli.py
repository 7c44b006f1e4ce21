"""The `dft` command line. Subcommands stay thin: they parse arguments and call the library."""
from __future__ import annotations

import argparse
import sys

from distributed_ft.errors import DftError


def _cmd_train(args) -> int:
    from distributed_ft.train import run_train

    return run_train(args.config, args.overrides)


def _cmd_config_show(args) -> int:
    import yaml

    from distributed_ft.config import config_to_dict, load_config

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0


def _cmd_config_validate(args) -> int:
    from distributed_ft.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"{args.config}: valid (strategy '{config.strategy.name}', model task '{config.model.task}')")
    return 0


def _cmd_strategies(args) -> int:
    from distributed_ft.strategies import registered

    for name, strategy in registered().items():
        print(f"{name:<12} {strategy.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dft", description="Fine-tune language models on one CPU or many GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model from a run config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key.sub=value")
    train.set_defaults(func=_cmd_train)

    config = sub.add_parser("config", help="show or validate a run config")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_cmd_config_show)
    validate = config_sub.add_parser("validate", help="check a config without running it")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=_cmd_config_validate)

    strategies = sub.add_parser("strategies", help="list the registered fine-tuning strategies")
    strategies.set_defaults(func=_cmd_strategies)

    from distributed_ft import ppo
    from distributed_ft.cluster import cli as cluster_cli
    from distributed_ft.eval import cli as eval_cli
    from distributed_ft.grader import cli as grader_cli

    ppo.add_subparser(sub)
    eval_cli.add_subparser(sub)
    grader_cli.add_subparser(sub)
    cluster_cli.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """Process entry point of `dft` and `python -m distributed_ft`."""
    from distributed_ft.engine.process_exit import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
