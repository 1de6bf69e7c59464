"""Fidelity: how close the student gets to the teacher, on held-out text of the training domain
and of another domain, for the default run, the one-hour config and the recipe comparison.

Every figure comes from the ``report.json`` of a ``distill run`` started here as a user starts it
(a subprocess, the embedded teacher, the default corpus), so the numbers are the product's own.

    python benchmarks/fidelity.py default   # plain `distill run`, timed: targets default_*
    python benchmarks/fidelity.py hour      # configs/hour.yaml (about an hour): hour_top1
    python benchmarks/fidelity.py hour --arms mix_answers   # arms at the hour budget, an hour each
    python benchmarks/fidelity.py hour --arms lr_5e-4 --prose   # an arm on the hour config itself
    python benchmarks/fidelity.py compare [--arms default,jsd] [--jobs 1] [--seed 0] [--steps 60]
    python benchmarks/fidelity.py shape     # batch-1 decoding: depth vs width-pruned students
    python benchmarks/fidelity.py table     # the comparison as a Markdown table

``compare`` trains every recipe of ``ARMS`` at the default budget on the same student (the
teacher layers an earlier default run's search kept, ``COMPARE_LAYERS``, so the search is not
repeated) with the lean evaluation (no speed test, no curve, no bits per byte);
The ``mix_*`` arms add teacher-written text (``distill generate``: its answers to the shipped
prompts, or to ``data/prose_prompts.txt`` for everyday prose; written once to
``runs/fidelity/teacher_KIND.jsonl`` and reused) as a second source that only trains
(``heldout: false``), so every arm is scored on the same held-out sets.
``--jobs 2`` runs two arms at once, one thread each (quality, not time, is compared; on 2
cores one arm at a time with both threads finished sooner). The
winner is chosen on the training domain's held-out KL, with the other domain's KL beside it.
Targets: default_top1_agreement >= 0.55, default_kl <= 0.95, other_domain_kl_ratio <= 0.7
(student after / before on the second held-out set), default_minutes <= 15 (wall clock of the
default run, 2 cores), hour_top1_agreement >= 0.62.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from common import RESULTS, merge_results, print_table, provenance, target

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "fidelity"

# The recipe comparison: each arm is the default run (pure distillation, T = 1, lr 1e-3) with
# these overrides; old_default is the recipe before this comparison (0.5 CE + 0.5 KL at T = 2,
# lr 2e-4).
ARMS: dict[str, list[str]] = {
    "old_default": ["loss.alpha=0.5", "loss.temperature=2", "train.lr=2e-4"],
    "alpha_0.5_T_2": ["loss.alpha=0.5", "loss.temperature=2"],
    "default": [],
    "lr_2e-3": ["train.lr=2e-3"],
    "lr_5e-4": ["train.lr=5e-4"],  # for the hour budget: ten times the steps may want a lower lr
    "intermediate": ["intermediate.hidden_weight=1.0", "intermediate.hidden_loss=cosine"],
    "alpha_0.5": ["loss.alpha=0.5"],
    "T_2": ["loss.temperature=2"],
    "jsd": ["loss.divergence=jsd"],
    "skew_forward_kl": ["loss.divergence=skew_forward_kl"],
    "reverse_kl": ["loss.divergence=reverse_kl"],
    "lr_constant": ["train.min_lr_ratio=1.0"],
    "alpha_0.5_to_0": ["loss.alpha=0.5", "loss.alpha_schedule=linear", "loss.alpha_end=0"],
}
# Teacher-written text for the data-mix arms, generated once by `distill generate` with these
# settings and reused; every row trains, none is held out, so the run is still scored on the
# corpus's held-out blocks and on the other domain's set. `answers`: the teacher's answers to the
# shipped prompts (mostly questions about programming and science). `prose`: its answers to the
# 240 prompts of data/prose_prompts.txt, twelve genres of everyday prose (stories, letters, news,
# recipes, travel notes, conversations, ...), twenty subjects each, written for this benchmark;
# none of its subjects is one of the other-domain set's pieces, whose text never enters.
TEACHER_TEXT: dict[str, tuple[Path | None, list[str]]] = {
    "answers": (None, ["generate.max_new_tokens=256", "generate.batch_size=16", "seed=0"]),
    "prose": (
        Path(__file__).resolve().parent / "data" / "prose_prompts.txt",
        ["generate.max_new_tokens=320", "generate.batch_size=16", "seed=0"],
    ),
}


def teacher_text_path(kind: str) -> Path:
    return RUNS / f"teacher_{kind}.jsonl"


def teacher_plain_text_path(kind: str) -> Path:
    """The teacher's responses alone as ``{"text"}`` rows, packed into blocks like the corpus."""
    return RUNS / f"teacher_{kind}_text.jsonl"


def mix(kind: str, weight: float, packed: bool = False) -> list[str]:
    """Overrides: the default corpus and the teacher's text of ``kind``, drawn ``1 : weight`` by
    row: chat rows (one block each, the prompt and template untrained), or ``packed``, the
    responses' text packed into full blocks, every token trained."""
    path, form = (
        (teacher_plain_text_path(kind), "text") if packed else (teacher_text_path(kind), "chat")
    )
    rows = f"{{path: '{path}', format: {form}, heldout: false, weight: {weight}}}"
    return [f"data.sources=[{{}}, {rows}]"]


ARMS["mix_answers"] = mix("answers", 1.0)
ARMS["mix_answers_0.25"] = mix("answers", 1 / 3)
ARMS["mix_prose"] = mix("prose", 1.0)
ARMS["mix_prose_0.25"] = mix("prose", 1 / 3)
ARMS["mix_prose_0.1"] = mix("prose", 1 / 9)
ARMS["mix_prose_packed_0.25"] = mix("prose", 1 / 3, packed=True)
ARMS["mix_prose_packed_0.1"] = mix("prose", 1 / 9, packed=True)

# The student's shape: the default depth-searched student against width-pruned ones (all 30
# teacher layers, a narrower MLP): one at equal parameters (MLP 512), one at equal batch-1
# decoding speed (the widest MLP of WIDTH_CANDIDATES that decodes at least as fast as the depth
# student, measured by `fidelity.py shape` and read from its section).
WIDTH_CANDIDATES = (512, 384, 256, 192, 128, 64)
ALL_LAYERS = list(range(30))
ARMS["width_ffn_512"] = [f"student.layers={ALL_LAYERS}", "student.ffn=512"]
ARMS["width_equal_speed"] = [f"student.layers={ALL_LAYERS}"]  # + student.ffn from `shape`

# The student every comparison row and hour arm was measured on: the teacher layers the search
# kept for the 80-step default on the corpus alone (its `default` section at 67c1eb5). Since the
# prose joined the default, the search draws calibration blocks from it too and keeps layer 19
# instead of 22; the comparison keeps its own student, so its rows stay comparable.
COMPARE_LAYERS = (0, 1, 2, 8, 9, 10, 11, 20, 21, 22, 23, 24, 27, 28, 29)

# The comparison's budget: the 60 steps of 4 x 256 tokens the default had when it was run, on
# the corpus alone, as its rows were measured before the teacher's prose joined the default
# (the mix_* arms add their own sources).
COMPARE_STEPS = 60
LEAN = ["eval.speed=false", "eval.every=0", "eval.bits_per_byte=false"]
CORPUS_ALONE = "data.prose_share=0"


def distill_run(
    name: str, overrides: list[str], log: Path, config: Path | None = None
) -> tuple[dict, float]:
    """Run ``distill run`` as a subprocess; its report and its wall-clock seconds."""
    command = [sys.executable, "-m", "distill", "run", "--name", name]
    command += ["--config", str(config)] if config else []
    for override in [f"output_dir={RUNS}", *overrides]:
        command += ["--set", override]
    shutil.rmtree(RUNS / name, ignore_errors=True)  # an earlier measurement of this arm
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"distill run {name} failed (exit {done.returncode}); see {log}")
    report = json.loads((RUNS / name / "report.json").read_text())
    return {**report, "probes": probe_curve(RUNS / name / "metrics.jsonl")}, seconds


def probe_curve(metrics: Path) -> list[dict]:
    """The run's fidelity probes (every ``eval.every`` steps): step, then KL and top-1 agreement
    per held-out set, from its metrics log."""
    curve = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "fidelity" in record:
            curve.append({"step": record["step"], **record["fidelity"]})
    return curve


def fidelity_row(report: dict, seconds: float) -> dict:
    """What a run kept of the teacher, on both held-out sets, from its report."""
    models, other = report["models"], report["extra_sets"]["other_domain"]["models"]
    after, before = models["student_after"], models["student_before"]
    return {
        "kl": after["kl_to_teacher"],
        "top1": after["top1_agreement"],
        "top5": after["top5_agreement"],
        "perplexity": after["perplexity"],
        "teacher_perplexity": models["teacher"]["perplexity"],
        "samples_teacher_nll": after.get("teacher_nll"),
        "kl_before": before["kl_to_teacher"],
        "other_kl": other["student_after"]["kl_to_teacher"],
        "other_top1": other["student_after"]["top1_agreement"],
        "other_kl_before": other["student_before"]["kl_to_teacher"],
        "other_samples_teacher_nll": other["student_after"].get("teacher_nll"),
        "epochs": report["plan"]["epochs"],
        "train_seconds": report["training"]["train_seconds"],
        "wall_seconds": seconds,
        "student_layers": report["plan"].get("student_layers"),
        "probes": report.get("probes", []),
    }


def run_default(args: argparse.Namespace) -> None:
    report, seconds = distill_run("default", [], RUNS / "default.log")
    row = fidelity_row(report, seconds)
    row["minutes"] = seconds / 60
    targets = [
        target("default_top1_agreement", row["top1"], 0.55, "higher"),
        target("default_kl", row["kl"], 0.95, "lower"),
        target("other_domain_kl_ratio", row["other_kl"] / row["other_kl_before"], 0.7, "lower"),
        target("default_minutes", row["minutes"], 15.0, "lower"),
    ]
    # The whole report's tables too: the top-level README's default-run table quotes them.
    keep = ("models", "extra_sets", "training", "plan", "verdict")
    report_part = {key: report[key] for key in keep if key in report}
    path = merge_results("fidelity", "default", {"row": row, "report": report_part}, targets)
    print_rows({"default": row})
    print(f"wrote {path}")


def run_hour(args: argparse.Namespace) -> None:
    config = ROOT / "configs" / "hour.yaml"
    if args.arms:
        run_hour_arms(args, config)
        return
    report, seconds = distill_run("hour", [], RUNS / "hour.log", config)
    row = fidelity_row(report, seconds)
    row["minutes"] = seconds / 60
    targets = [target("hour_top1_agreement", row["top1"], 0.62, "higher")]
    path = merge_results("fidelity", "hour", {"config": "configs/hour.yaml", "row": row}, targets)
    print_rows({"hour": row})
    print(f"wrote {path}")


def saved_section(name: str) -> dict:
    """Section ``name`` of the committed ``results/fidelity.json`` ({} when it has none)."""
    path = RESULTS / "fidelity.json"
    return json.loads(path.read_text()).get(name, {}) if path.is_file() else {}


def searched_layers(given: str) -> list[int]:
    """The comparison's student: ``--layers``, else :data:`COMPARE_LAYERS`."""
    return [int(layer) for layer in given.split(",")] if given else list(COMPARE_LAYERS)


def teacher_text(kind: str) -> Path:
    """The teacher-written rows of a data-mix arm, generated once (resumable) and kept."""
    prompts, settings = TEACHER_TEXT[kind]
    output = teacher_text_path(kind)
    log = RUNS / f"teacher_{kind}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "distill", "generate", "--out", str(output)]
    command += ["--prompts", str(prompts)] if prompts else []
    command += [item for override in settings for item in ("--set", override)]
    command += ["--set", f"output_dir={RUNS}", "--name", f"teacher-{kind}"]
    with log.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"distill generate failed (exit {done.returncode}); see {log}")
    with output.open() as rows, teacher_plain_text_path(kind).open("w") as plain:
        for line in rows:
            response = json.loads(line)["messages"][-1]["content"]
            plain.write(json.dumps({"text": response}) + "\n")
    return output


def arm_overrides(given: str) -> dict[str, list[str]]:
    """The overrides of the arms named in ``given`` (comma-separated; empty: every arm), with
    what they need made ready: the teacher's answers for a mix, the MLP width of equal speed."""
    names = given.split(",") if given else list(ARMS)
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        sys.exit(f"fidelity.py: unknown arm(s) {unknown}; expected some of {list(ARMS)}")
    for kind in TEACHER_TEXT:
        if any(name.startswith(f"mix_{kind}") for name in names):
            teacher_text(kind)
    arms = {name: list(ARMS[name]) for name in names}
    if "width_equal_speed" in arms:  # its MLP width comes from the `shape` results
        arms["width_equal_speed"].append(f"student.ffn={equal_speed_ffn()}")
    return arms


def hour_arm_common(args: argparse.Namespace) -> list[str]:
    """Overrides every hour arm shares. By default the corpus alone on the comparison's student,
    so the rows compare with ``corpus_alone``; with ``--prose`` the hour config as shipped (its
    prose) on the student the ``hour`` run's search kept, so they compare with that run."""
    if args.prose and not args.layers:
        layers = saved_section("hour")["row"]["student_layers"]
    else:
        layers = searched_layers(args.layers)
    common = [f"student.layers={layers}"]
    return common if args.prose else [*common, CORPUS_ALONE]


def run_hour_arms(args: argparse.Namespace, config: Path) -> None:
    """Arms of ``ARMS`` at the one-hour budget: configs/hour.yaml with each arm's overrides and
    :func:`hour_arm_common`, one after another; section ``hour_compare`` (no target), rows
    ``NAME`` (the corpus alone) or ``NAME_prose`` (``--prose``)."""
    arms = arm_overrides(args.arms)
    if args.prose:
        arms = {f"{name}_prose": overrides for name, overrides in arms.items()}
    common = hour_arm_common(args)
    existing = saved_section("hour_compare")
    rows = dict(existing.get("rows", {}))
    for name, overrides in arms.items():
        report, seconds = distill_run(
            f"hour-{name}", [*common, *overrides], RUNS / f"hour-{name}.log", config
        )
        # rows of earlier runs keep their own commit; the section's is the latest run's
        commit = provenance()["commit"]
        rows[name] = {"overrides": overrides, "commit": commit, **fidelity_row(report, seconds)}
        rows[name]["common_overrides"] = common
        payload = {"config": "configs/hour.yaml", "common_overrides": common, "rows": rows}
        merge_results("fidelity", "hour_compare", payload, [])
    print_rows(rows)


def run_compare(args: argparse.Namespace) -> None:
    arms = arm_overrides(args.arms)
    if args.seed:  # another data order: rows named NAME_seedN beside the seed-0 ones
        arms = {f"{name}_seed{args.seed}": [*o, f"seed={args.seed}"] for name, o in arms.items()}
    if args.steps != COMPARE_STEPS:  # another budget: rows named NAME_stepsN
        arms = {
            f"{name}_steps{args.steps}": [*o, f"train.steps={args.steps}"]
            for name, o in arms.items()
        }
    layers = searched_layers(args.layers)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    common = [
        *LEAN,
        CORPUS_ALONE,
        f"train.steps={COMPARE_STEPS}",
        f"student.layers={layers}",
        f"train.threads={threads}",
    ]
    existing = saved_section("compare")
    rows = dict(existing.get("rows", {}))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(
                distill_run, f"arm-{name}", [*common, *overrides], RUNS / f"{name}.log"
            ): name
            for name, overrides in arms.items()
        }
        for future in as_completed(futures):
            name = futures[future]
            commit = provenance()["commit"]  # rows of earlier runs keep their own
            rows[name] = {
                "overrides": arms[name],
                "commit": commit,
                **fidelity_row(*future.result()),
            }
            payload = {"common_overrides": common, "jobs": args.jobs, "rows": rows}
            merge_results("fidelity", "compare", payload, [])
            print(f"{name}: KL {rows[name]['kl']:.3f}, top-1 {rows[name]['top1']:.3f}", flush=True)
    print_rows(rows)


DECODE_PROMPT = ["The history of the lighthouse on the island begins"]


def decode_seconds(model, tokenizer) -> float:
    """Seconds of one batch-1 greedy decoding of 32 tokens."""
    from distill.evaluate.generation import timed_generate

    return timed_generate(model, tokenizer, DECODE_PROMPT, 32)


def run_shape(args: argparse.Namespace) -> None:
    """Batch-1 decoding speed of the depth student and of width-pruned students (untrained:
    speed depends on the shape alone), taking turns run by run; writes section ``shape`` with
    the MLP width the ``width_equal_speed`` arm uses."""
    import statistics

    import torch

    from distill.models import count_params, default_teacher_path, load_causal_lm, load_tokenizer
    from distill.student import WidthTargets, build_student, measure_importance, prune_width

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    source = default_teacher_path()
    teacher, tokenizer = load_causal_lm(source).eval(), load_tokenizer(source)
    full = build_student(teacher, ALL_LAYERS)
    calibration = torch.randint(0, tokenizer.vocab_size, (2, 64))  # (2, 64): shape, not quality
    importance = measure_importance(full, calibration)
    models = {"depth": build_student(teacher, searched_layers(args.layers)).eval()}
    for ffn in WIDTH_CANDIDATES:
        models[f"width_ffn_{ffn}"] = prune_width(full, importance, WidthTargets(ffn=ffn)).eval()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # one untimed warm-up each
            decode_seconds(model, tokenizer)
        for _ in range(args.runs):  # turns: load changes hit every shape alike
            for name, model in models.items():
                seconds[name].append(decode_seconds(model, tokenizer))
    speed = {name: 32 / statistics.median(values) for name, values in seconds.items()}
    fast_enough = [f for f in WIDTH_CANDIDATES if speed[f"width_ffn_{f}"] >= speed["depth"]]
    equal_speed_ffn = max(fast_enough) if fast_enough else None
    print_table(
        [
            (name, f"{count_params(m) / 1e6:.1f}", f"{speed[name]:.1f}")
            for name, m in models.items()
        ],
        ("student", "params (M)", "batch-1 tokens/s (median)"),
    )
    print(f"widest MLP decoding at least as fast as the depth student: {equal_speed_ffn}")
    payload = {
        "runs": args.runs,
        "params": {name: count_params(model) for name, model in models.items()},
        "decode_seconds_32_tokens": seconds,
        "tokens_per_s": speed,
        "equal_speed_ffn": equal_speed_ffn,
    }
    print(f"wrote {merge_results('fidelity', 'shape', payload, [])}")


def equal_speed_ffn() -> int:
    """The MLP width of the ``width_equal_speed`` arm (``fidelity.py shape`` finds it)."""
    section = saved_section("shape")
    if not section.get("equal_speed_ffn"):
        sys.exit("fidelity.py compare width_equal_speed: run `fidelity.py shape` first")
    return int(section["equal_speed_ffn"])


def print_rows(rows: dict[str, dict]) -> None:
    header = ("recipe", "KL", "top-1", "top-5", "ppl", "other KL", "other top-1", "epochs", "min")
    print_table(
        [
            (
                name,
                f"{row['kl']:.3f}",
                f"{row['top1']:.3f}",
                f"{row['top5']:.3f}",
                f"{row['perplexity']:.1f}",
                f"{row['other_kl']:.3f}",
                f"{row['other_top1']:.3f}",
                f"{row['epochs']:.2f}",
                f"{row['wall_seconds'] / 60:.1f}",
            )
            for name, row in sorted(rows.items(), key=lambda item: item[1]["kl"])
        ],
        header,
    )


def short(override: str) -> str:
    """An override as the table shows it: all 30 layers named so, a run path made relative."""
    if override == f"student.layers={ALL_LAYERS}":
        return "student.layers=(all 30)"
    return re.sub(r"'[^']*/(runs/fidelity/[^']*)'", r"\1", override)


def markdown_table(args: argparse.Namespace) -> None:
    """The comparison as benchmarks/README.md shows it, from the committed results."""
    results = json.loads((RESULTS / "fidelity.json").read_text())
    rows = results.get("compare", {}).get("rows", {})
    print("| recipe | overrides | KL | top-1 | top-5 | ppl | other KL | other top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in sorted(rows.items(), key=lambda item: item[1]["kl"]):
        overrides = ", ".join(f"`{short(item)}`" for item in row["overrides"]) or "(none)"
        print(
            f"| {name} | {overrides} | {row['kl']:.3f} | {row['top1']:.3f} | {row['top5']:.3f} "
            f"| {row['perplexity']:.1f} | {row['other_kl']:.3f} | {row['other_top1']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["default", "hour", "compare", "shape", "table"])
    parser.add_argument("--arms", default="", help="compare, hour: comma-separated arm names")
    parser.add_argument("--layers", default="", help="compare: teacher layers, e.g. 0,1,2,29")
    parser.add_argument("--jobs", type=int, default=1, help="compare: arms run at once")
    parser.add_argument("--seed", type=int, default=0, help="compare: the runs' seed (data order)")
    parser.add_argument(
        "--steps", type=int, default=COMPARE_STEPS, help="compare: training steps of every arm"
    )
    parser.add_argument(
        "--prose",
        action="store_true",
        help="hour --arms: on the hour config with its prose (rows NAME_prose), not the corpus alone",
    )
    parser.add_argument("--runs", type=int, default=5, help="shape: timed decodes per student")
    parser.add_argument(
        "--threads", type=int, default=0, help="compare: threads per arm (0 = cores / jobs)"
    )
    args = parser.parse_args()
    jobs = {"default": run_default, "hour": run_hour, "compare": run_compare}
    jobs["table"] = markdown_table
    jobs["shape"] = run_shape
    jobs[args.what](args)


if __name__ == "__main__":
    main()
