"""`grader serve | check | validate` subcommands (argparse), each returning an exit code."""
from __future__ import annotations

import argparse
import json
import sys

from distributed_ft.errors import ConfigError


def _cmd_serve(args: argparse.Namespace) -> int:
    from distributed_ft.grader.server import serve

    serve(args.config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
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


def _cmd_validate(args: argparse.Namespace) -> int:
    from distributed_ft.grader.spec import load_grader_spec

    spec = load_grader_spec(args.config)
    print(json.dumps({"ok": True, "type": spec.type, "name": spec.name}))
    return 0


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `grader {serve,check,validate}` to an argparse subparsers object."""
    grader = subparsers.add_parser("grader", help="reward grading service for RL fine-tuning")
    sub = grader.add_subparsers(dest="grader_command", required=True)

    serve = sub.add_parser("serve", help="serve a grader over HTTP")
    serve.add_argument("--config", required=True, help="grader spec (YAML or JSON)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs DFT_GRADER_TOKEN)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser("check", help="grade one sample locally and print the result as JSON")
    check.add_argument("--config", required=True)
    check.add_argument("--sample", required=True, help="the model output text")
    check.add_argument("--item", default="{}", help="the dataset row as JSON")
    check.set_defaults(func=_cmd_check)

    validate = sub.add_parser("validate", help="check a grader spec without loading models")
    validate.add_argument("--config", required=True)
    validate.set_defaults(func=_cmd_validate)
    return grader


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m distributed_ft.grader ...`)."""
    from distributed_ft.errors import DftError

    parser = argparse.ArgumentParser(prog="python -m distributed_ft.grader")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = parser.parse_args(["grader"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except DftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
