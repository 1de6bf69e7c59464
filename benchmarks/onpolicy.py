"""On-policy vs sequence-level vs off-policy KD at an equal wall-clock budget (issue 6).

Default teacher (SmolLM2-135M-Instruct) and one 15-layer student built from it (the default
greedy-KL layer search), copied into
three arms that each train for ``--budget`` seconds (``train.max_seconds``; constant learning
rate after warm-up, so no arm is cut off mid-decay):

  seqkd     supervised KD on the teacher's own responses to the training prompts (``distill
            generate``), loss on the assistant tokens only
  onpolicy  the same data, but with probability lambda = 0.5 a micro-batch is the student's own
            continuation of the prompts, scored by the teacher with the generalized JSD (beta 0.5)
  offpolicy the spine: forward-KL KD on packed blocks of the default corpus (pydoc topics)

Measured on held-out prompts (never trained on): the teacher's per-token NLL of the student's own
samples and KL(student || teacher) at those tokens, and the student's forward KL on the teacher's
responses to those prompts. Writes benchmarks/results/onpolicy.json.

    python benchmarks/onpolicy.py [--budget 240] [--threads 1] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import print_table, target, write_results

from distill import distill
from distill.config import load_config
from distill.data.chat import render_prompt
from distill.data.examples import encode_examples, read_rows, split_rows
from distill.data.prompts import default_prompts_path
from distill.evaluate import heldout_metrics
from distill.evaluate.samples import score_student_samples
from distill.io import atomic_directory
from distill.pipelines.generate import generate_responses
from distill.pipelines.run_models import prepare_models
from distill.sampling import Sampling
from distill.teacher import LiveTeacher

BLOCK_SIZE = 256
ARMS = {
    "seqkd": {"loss": {"divergence": "forward_kl"}},
    "onpolicy": {
        "loss": {"divergence": "jsd", "beta": 0.5},
        "onpolicy": {"lambda": 0.5, "max_new_tokens": 64, "temperature": 1.0},
    },
    "offpolicy": {"loss": {"divergence": "forward_kl"}},
}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _generations(work: Path, prompts: Path, name: str, threads: int, new_tokens: int) -> Path:
    config = load_config(
        overrides=[
            f"output_dir={work}",
            f"name={name}",
            f"generate.prompts={prompts}",
            f"generate.max_new_tokens={new_tokens}",
            "generate.batch_size=16",
            f"train.threads={threads}",
        ]
    )
    return generate_responses(config)


def _base_config(work: Path, threads: int, budget: float) -> dict:
    return {
        "output_dir": str(work / "runs"),
        "data": {"block_size": BLOCK_SIZE},
        "train": {
            "steps": 10_000,
            "batch_size": 4,
            "warmup_steps": 4,
            "min_lr_ratio": 1.0,
            "max_seconds": budget,
            "threads": threads,
        },
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"max_blocks": 2, "speed": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the defaults are the settings of the committed results/onpolicy.json
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per arm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    parser.add_argument("--new-tokens", type=int, default=64, help="teacher response length")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-onpolicy-"))
    work.mkdir(parents=True, exist_ok=True)

    rows = read_rows(default_prompts_path())
    train_rows, heldout_rows = split_rows(rows, args.heldout_fraction)
    train_prompts = _write_rows(work / "train_prompts.jsonl", train_rows)
    heldout_prompts = _write_rows(work / "heldout_prompts.jsonl", heldout_rows)
    print(f"{len(train_rows)} training prompts, {len(heldout_rows)} held-out prompts; {work}")
    train_data = _generations(work, train_prompts, "gen_train", args.threads, args.new_tokens)
    heldout_data = _generations(work, heldout_prompts, "gen_heldout", args.threads, args.new_tokens)

    base = _base_config(work, args.threads, args.budget)
    student_dir = work / "student_init"  # the 15-layer student every arm starts from
    built = student_dir.exists()  # a rerun in the same --work folder reuses it
    init = load_config(base=base, overrides=[f"student.path={student_dir}"] if built else [])
    models = prepare_models(init)
    if not built:
        with atomic_directory(student_dir) as tmp:
            models.student.save_pretrained(tmp, safe_serialization=True)
            models.tokenizer.save_pretrained(tmp)
    tokenizer, teacher = models.tokenizer, LiveTeacher(models.teacher, models.vocab_rows)

    students, runs = {"initial": models.student.eval()}, {}
    for arm, settings in ARMS.items():
        config = json.loads(json.dumps(base))
        config["name"] = arm
        config["student"] = {"path": str(student_dir)}
        config["data"]["path"] = None if arm == "offpolicy" else str(train_data)
        for section, values in settings.items():
            config.setdefault(section, {}).update(values)
        shutil.rmtree(work / "runs" / arm, ignore_errors=True)  # a rerun trains the arm afresh
        result = distill(config)
        metrics = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in metrics]
        onpolicy_records = [r for r in records if "onpolicy_fraction" in r]
        runs[arm] = {
            "steps": len(records),
            "train_seconds": records[-1]["elapsed_s"],
            "tokens_seen": sum(r["tokens"] for r in records),
            "onpolicy_fraction": (
                sum(r["onpolicy_fraction"] for r in onpolicy_records) / len(onpolicy_records)
                if onpolicy_records
                else 0.0
            ),
        }
        students[arm] = result.student.eval()

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    heldout_prompt_ids = [render_prompt(tokenizer, row["messages"]) for row in heldout_rows]
    heldout_examples = encode_examples(
        read_rows(heldout_data), "chat", tokenizer, BLOCK_SIZE, str(heldout_data)
    )
    quality = heldout_metrics(
        students,
        teacher,
        heldout_examples.input_ids,
        vocab_rows=models.vocab_rows,
        batch_size=8,
        labels=heldout_examples.labels,
    )
    sampling = Sampling(max_new_tokens=64, temperature=1.0, top_p=1.0)
    measured = {}
    for name, student in students.items():
        samples = score_student_samples(
            student, teacher, heldout_prompt_ids, sampling, eos_token_id=eos, pad_token_id=pad
        )
        measured[name] = {
            **samples,
            "heldout_kl_on_teacher_responses": quality[name]["kl_to_teacher"],
            **runs.get(name, {}),
        }

    rows_out = [
        (
            name,
            str(m.get("steps", "-")),
            f"{m['teacher_nll']:.3f}",
            f"{m['reverse_kl']:.3f}",
            f"{m['heldout_kl_on_teacher_responses']:.3f}",
            f"{m['generated_tokens_mean']:.1f}",
        )
        for name, m in measured.items()
    ]
    print_table(
        rows_out,
        (
            "student",
            "steps",
            "teacher NLL on own samples",
            "KL(q||p) on own",
            "held-out KL",
            "sample len",
        ),
    )
    ratio = measured["onpolicy"]["teacher_nll"] / measured["offpolicy"]["teacher_nll"]
    path = write_results(
        "onpolicy",
        {
            "targets": [
                target("onpolicy_vs_offpolicy_teacher_nll_on_student_samples", ratio, 1.0, "lower")
            ],
            "settings": {
                "budget_seconds_per_arm": args.budget,
                "threads": args.threads,
                "block_size": BLOCK_SIZE,
                "batch_size": 4,
                "train_prompts": len(train_rows),
                "heldout_prompts": len(heldout_rows),
                "teacher_response_tokens": args.new_tokens,
                "eval_sampling": {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0},
                "arms": ARMS,
            },
            "models": measured,
            "ratios": {
                "onpolicy_vs_offpolicy_teacher_nll": ratio,
                "seqkd_vs_offpolicy_teacher_nll": measured["seqkd"]["teacher_nll"]
                / measured["offpolicy"]["teacher_nll"],
                "onpolicy_vs_seqkd_teacher_nll": measured["onpolicy"]["teacher_nll"]
                / measured["seqkd"]["teacher_nll"],
            },
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
