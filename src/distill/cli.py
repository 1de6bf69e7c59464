"""The ``distill`` command line: parses arguments, builds the config, calls the library.

User mistakes (bad config, missing files, incompatible models) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distill.errors import ConfigError, DistillError

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
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run exactly from its newest valid checkpoint",
    )
    run.add_argument(
        "--force", action="store_true", help="with --resume: accept a config that differs"
    )

    config = commands.add_parser("config", help="show the default config or validate one")
    _add_config_args(config)
    config.add_argument(
        "--show", action="store_true", help="print every key with its default and meaning"
    )

    cache = commands.add_parser(
        "cache", help="run the teacher once and store its top-k soft targets (teacher.cache)"
    )
    _add_config_args(cache)
    cache.add_argument("--out", metavar="DIR", help="where to write (= --set teacher.cache=DIR)")
    cache.add_argument(
        "--teacher",
        metavar="NAME",
        help="with teachers: cache that teacher's rows into its own cache key",
    )
    cache.add_argument(
        "--inspect", metavar="DIR", help="print a cache's manifest and verify every shard's sha256"
    )

    _add_data(commands)

    generate = commands.add_parser(
        "generate", help="the teacher answers prompts or continues corpus text (.jsonl)"
    )
    _add_config_args(generate)
    generate.add_argument(
        "--prompts", metavar="FILE", help=".txt or .jsonl prompts (= --set generate.prompts=FILE)"
    )
    generate.add_argument("--out", metavar="FILE", help="output .jsonl (= generate.output)")
    generate.add_argument("--name", help="run name (same as --set name=...)")

    serve = commands.add_parser(
        "serve-teacher",
        help="serve the teacher's top-k log-probabilities over HTTP (vLLM / SGLang schema)",
    )
    _add_config_args(serve)
    serve.add_argument("--host", help="address to listen on (= serve.host; default loopback)")
    serve.add_argument("--port", type=int, help="port (= serve.port; 0 = any free port)")

    _add_eval_compress_export(commands)
    _add_student(commands)

    report = commands.add_parser("report", help="rebuild report.json/md and loss.png of a run")
    report.add_argument("run_dir")
    return parser


def _run(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.pipelines.run import distill, resume_config

    overrides = list(args.overrides)
    if args.baseline:
        overrides.append("baseline=true")
    if args.name:
        overrides.append(f"name={args.name}")
    if args.resume:
        distill(resume_config(args.resume, args.config, overrides, args.force), resume=True)
    else:
        distill(load_config(args.config, overrides))


def _config(args: argparse.Namespace) -> None:
    import yaml

    from distill.config import describe_defaults, load_config

    if args.show:
        print(describe_defaults())
        return
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def _cache(args: argparse.Namespace) -> None:
    if args.inspect:
        from distill.teacher.cache import inspect_cache

        inspect_cache(args.inspect)
        return
    from distill.config import load_config
    from distill.pipelines.cache import cache_job

    if args.out and args.teacher:
        raise ConfigError("distill cache: --out with --teacher: the cache goes to its cache key")
    overrides = list(args.overrides) + ([f"teacher.cache={args.out}"] if args.out else [])
    config = load_config(args.config, overrides)
    if cache_job(config, args.teacher):
        named = [t for t in config.teachers or [] if t.name == args.teacher]
        written = named[0].cache if named else config.teacher.cache
        print(f"wrote {written}; check it with `distill cache --inspect`")


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="token shards: prepare a corpus once, inspect it")
    actions = data.add_subparsers(dest="data_command", required=True)
    prepare = actions.add_parser(
        "prepare", help="tokenize data.path once into token shards (data.shards), resumable"
    )
    _add_config_args(prepare)
    prepare.add_argument("--out", metavar="DIR", help="where to write (= --set data.shards=DIR)")
    inspect = actions.add_parser(
        "inspect", help="print a shard directory's manifest and verify every shard's sha256"
    )
    inspect.add_argument("directory", metavar="DIR")


def _data(args: argparse.Namespace) -> None:
    from distill.pipelines.data_prepare import inspect_shards, prepare_shards

    if args.data_command == "inspect":
        inspect_shards(args.directory)
        return
    from distill.config import load_config

    overrides = list(args.overrides) + ([f"data.shards={args.out}"] if args.out else [])
    config = load_config(args.config, overrides)
    manifest = prepare_shards(config)
    tokens = {name: part["tokens"] for name, part in manifest["splits"].items()}
    print(
        f"wrote {config.data.shards}: {tokens['train']:,} training and {tokens['heldout']:,} "
        f"held-out tokens; train on them with --set data.shards={config.data.shards}"
    )


def _generate(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.pipelines.generate import generate_responses

    overrides = list(args.overrides)
    if args.prompts:
        overrides.append(f"generate.prompts={args.prompts}")
    if args.out:
        overrides.append(f"generate.output={args.out}")
    if args.name:
        overrides.append(f"name={args.name}")
    print(generate_responses(load_config(args.config, overrides)))


def _serve_teacher(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.pipelines.serve_teacher import serve_teacher

    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    serve_teacher(load_config(args.config, overrides), ready=lambda line: print(line, flush=True))


def _add_student(commands) -> None:
    student = commands.add_parser(
        "student", help="build a student from the teacher (depth search, width pruning), save it"
    )
    _add_config_args(student)
    student.add_argument("--teacher", help="teacher model (default: the embedded SmolLM2)")
    student.add_argument(
        "--layers",
        type=int,
        help="layers to keep, searched (student.num_layers; greedy_kl "
        "unless --search or student.search says otherwise)",
    )
    student.add_argument("--search", choices=["none", "shortgpt", "angular", "greedy_kl"])
    for flag in ("ffn", "heads", "kv-heads", "hidden"):
        student.add_argument(f"--{flag}", type=int, help=f"width: student.{flag.replace('-', '_')}")
    student.add_argument("--out", required=True, metavar="DIR", help="where to save the student")


def _student(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.pipelines.student import format_costs, write_student

    overrides = list(args.overrides)
    if args.teacher:
        overrides.append(f"teacher.path={args.teacher}")
    if args.layers is not None:
        overrides.append(f"student.num_layers={args.layers}")
    config = load_config(args.config, overrides)
    search = args.search or (
        "greedy_kl" if args.layers is not None and config.student.search == "none" else None
    )
    overrides += [f"student.search={search}"] if search else []
    for flag in ("ffn", "heads", "kv_heads", "hidden"):
        if getattr(args, flag) is not None:
            overrides.append(f"student.{flag}={getattr(args, flag)}")
    result = write_student(load_config(args.config, overrides), args.out)
    print(format_costs(result), end="")
    print(f"wrote {args.out}")


# `distill eval` shortcuts: flag, the config key it sets, its type.
_EVAL_FLAGS = [
    ("--teacher", "teacher.path", str),
    ("--data", "data.path", str),
    ("--text-field", "data.text_field", str),
    ("--block-size", "data.block_size", int),
    ("--max-blocks", "eval.max_blocks", int),
    ("--task", "eval.mc_task", str),
    ("--mc-limit", "eval.mc_limit", int),
    ("--new-tokens", "eval.gen_new_tokens", int),
    ("--runs", "eval.gen_runs", int),
    ("--threads", "train.threads", int),
]


def _add_eval_compress_export(commands) -> None:
    evaluate = commands.add_parser("eval", help="compare models: quality, multiple choice, speed")
    _add_config_args(evaluate)
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help="HF dir, .gguf or int8 dir")
    for flag, key, kind in _EVAL_FLAGS:
        evaluate.add_argument(flag, type=kind, help=f"= --set {key}=...")
    evaluate.add_argument("--no-speed", action="store_true", help="= --set eval.speed=false")
    evaluate.add_argument("--out", help="write the results as JSON here")

    compress = commands.add_parser("compress", help="prune / heal / quantize a run's student")
    _add_config_args(compress)
    compress.add_argument("run_dir")
    compress.add_argument("--quantize", help="none, int8, int8-weight-only or int4")
    compress.add_argument("--group-size", type=int, help="int4 group size (32, 64, 128)")
    compress.add_argument("--prune", help="share of weights to zero (e.g. 0.3), or 2:4")
    compress.add_argument("--heal-steps", type=int, help="distillation steps after pruning")
    compress.add_argument("--qad-steps", type=int, help="quantization-aware distillation steps")
    compress.add_argument(
        "--resume", action="store_true", help="continue an interrupted heal / QAD exactly"
    )

    export = commands.add_parser("export", help="write a HF directory and verified GGUF files")
    export.add_argument("model", help="HF model directory or distill compress output")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument(
        "--gguf",
        action="append",
        choices=["f16", "q8_0", "q4_0", "q4_1"],
        help="GGUF type (repeatable)",
    )


def _eval(args: argparse.Namespace) -> None:
    from distill.config import load_config
    from distill.io import atomic_write_json
    from distill.pipelines.eval import evaluate_models, format_tables

    overrides = list(args.overrides)
    for flag, key, _ in _EVAL_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_speed:
        overrides.append("eval.speed=false")
    result = evaluate_models(args.models, load_config(args.config, overrides))
    print(format_tables(result), end="")
    if args.out:
        atomic_write_json(args.out, result)


def _compress(args: argparse.Namespace) -> None:
    from distill.pipelines.compress import compress_run

    overrides = list(args.overrides)
    if args.quantize:
        overrides.append(f"compress.quantize={args.quantize}")
    if args.prune == "2:4":
        overrides += ["compress.prune=0.5", "compress.prune_pattern='2:4'"]
    elif args.prune:
        overrides.append(f"compress.prune={args.prune}")
    if args.heal_steps is not None:
        overrides.append(f"compress.heal_steps={args.heal_steps}")
    if args.group_size is not None:
        overrides.append(f"compress.group_size={args.group_size}")
    if args.qad_steps is not None:
        overrides.append(f"compress.qad_steps={args.qad_steps}")
    result = compress_run(args.run_dir, overrides, config_path=args.config, resume=args.resume)
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    print(f"wrote {result.model_dir}: {shown}")


def _export(args: argparse.Namespace) -> None:
    from distill.pipelines.export import export_model

    for kind, artifact in export_model(args.model, args.out, args.gguf or []).items():
        print(f"{kind}: {artifact}")


def _report(args: argparse.Namespace) -> None:
    from distill.report import build_report

    build_report(args.run_dir)
    print(f"wrote {os.path.join(args.run_dir, 'report.md')}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torchao (optional) logs native-library and pytree warnings when transformers imports it.
    for noisy in (
        "httpx",
        "urllib3",
        "transformers",
        "accelerate",
        "torchao",
        "torch.utils._pytree",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {"run": _run, "config": _config, "report": _report, "cache": _cache}
    handlers |= {"eval": _eval, "compress": _compress, "export": _export}
    handlers["student"] = _student
    handlers["generate"] = _generate
    handlers["data"] = _data
    handlers["serve-teacher"] = _serve_teacher
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
