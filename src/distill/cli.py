"""The ``distill`` command line: parses arguments, builds the config, calls the library.

User mistakes (bad config, missing files, incompatible models) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distill.errors import DistillError

__all__ = ["main", "build_parser"]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see `distill config --show`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.steps=200 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description="Knowledge distillation for large language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="distil a student from a teacher (default: embedded)")
    _add_config_args(run)
    run.add_argument(
        "--baseline",
        action="store_true",
        help="also train the student on labels alone for comparison",
    )
    run.add_argument("--name", help="run name (same as --set name=...)")

    config = commands.add_parser("config", help="show the default config or validate one")
    _add_config_args(config)
    config.add_argument(
        "--show", action="store_true", help="print every key with its default and meaning"
    )

    report = commands.add_parser("report", help="rebuild report.json/md and loss.png of a run")
    report.add_argument("run_dir")
    return parser


def _run(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.run import distill

    overrides = list(args.overrides)
    if args.baseline:
        overrides.append("baseline=true")
    if args.name:
        overrides.append(f"name={args.name}")
    distill(load_config(args.config, overrides))


def _config(args: argparse.Namespace) -> None:
    import yaml

    from distill.config import describe_defaults, load_config

    if args.show:
        print(describe_defaults())
        return
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def _report(args: argparse.Namespace) -> None:
    from distill.report import build_report

    build_report(args.run_dir)
    print(f"wrote {os.path.join(args.run_dir, 'report.md')}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {"run": _run, "config": _config, "report": _report}
    try:
        handlers[args.command](args)
    except DistillError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
