"""Teachers outside training memory: a served teacher against the cache and the live teacher,
and several teachers in one run, on the default teacher and student. Two arms (``--arm``), each
merged into benchmarks/results/served_teacher.json without touching the other's numbers.

``--arm served`` (default). The embedded SmolLM2-135M runs behind ``distill serve-teacher`` (a
separate process on loopback, sharing the machine's cores with the trainer); its 15-layer
student is trained ``--steps`` steps of ``--batch`` x ``--block`` tokens three times on the same
batches: from the server, from a k-cache of the same blocks (float32 log-probabilities, written
in the same batches the server forwards) and from the live teacher. Loss: tail bucket at T = 1
(exact from a server), alpha 0.5.

- ``served_vs_cache_final_loss_rel_diff``: |final loss served - cache| / cache, <= 1e-6 (the
  same SparseTargets, so the same run);
- ``served_step_overhead``: median KD step time from the server / from the cache (each step
  timed alone, teachers alternated, ``--timing-reps`` >= 5 each), <= 1.5.

``--arm multi``. Two teachers (``teachers:``): ``base``, the embedded teacher, and ``variant``,
the same model fine-tuned ``--finetune-steps`` steps on the shipped prompts (the chat-rendered
prompts of distill/data/files/prompts.jsonl). The data: the prompts, each row routed to
``variant`` by its ``teacher`` field, and about as many characters of pydoc topics (unrouted:
``base``). ``distill run`` trains the 15-layer student (keep_first 8 + keep_last 7) from both,
``--multi-steps`` steps (loss: forward KL at T = 1, alpha ``--alpha`` 0.5). Each teacher's
held-out rows (15% of its domain's documents, never in the run's data) are scored by the student
before and after against that teacher.

- ``multi_teacher_each_kl_drop``: the smallest over the teachers of KL(teacher || student)
  before / after on that teacher's held-out rows, >= 1.2.

    python benchmarks/served_teacher.py [--steps 5] [--batch 4] [--block 128] [--timing-reps 5]
    python benchmarks/served_teacher.py --arm multi [--multi-steps 40] [--finetune-steps 8]
    python benchmarks/served_teacher.py --arm multi --tiny   # a self-check on tiny random models
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import merge_results, print_table, step_timing, target, tiny_teacher  # noqa: E402

from distill import distill  # noqa: E402
from distill.config import (  # noqa: E402
    DataConfig,
    LossConfig,
    RunConfig,
    StudentConfig,
    TrainConfig,
    load_config,
)
from distill.data import BlockBatches, default_documents, pack_documents, split_documents  # noqa: E402
from distill.data.examples import read_rows  # noqa: E402
from distill.data.prompts import default_prompts_path  # noqa: E402
from distill.evaluate import heldout_metrics  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.pipelines.training_data import prepare_data, prepare_training_data  # noqa: E402
from distill.student import build_student, make_student, select_layers  # noqa: E402
from distill.teacher import CachedTeacher, LiveTeacher, RemoteTeacher  # noqa: E402
from distill.teacher.cache_writer import cache_identity, write_cache  # noqa: E402
from distill.train import CausalLMTask, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, wait_s: float = 300.0) -> subprocess.Popen:
    """``distill serve-teacher`` on loopback in its own process; returns once /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "distill.cli", "serve-teacher", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"distill serve-teacher exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(1.0)
    server.terminate()
    raise RuntimeError(f"distill serve-teacher did not answer within {wait_s:.0f} s")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def served_arm(args: argparse.Namespace) -> None:

    config = RunConfig(
        data=DataConfig(block_size=args.block),
        train=TrainConfig(steps=args.steps, batch_size=args.batch),
        loss=LossConfig(temperature=1.0),
    )
    source = default_teacher_path()
    tokenizer = load_tokenizer(source)
    teacher = load_causal_lm(source)
    student = build_student(teacher, select_layers(30, StudentConfig())).train()
    train_blocks, _ = prepare_data(config, tokenizer)
    order = BlockBatches(train_blocks, args.batch, config.seed)
    used = torch.cat([order.next_batch() for _ in range(args.steps)])  # (steps * batch, block)
    vocab = teacher.get_output_embeddings().weight.shape[0]

    root = Path(tempfile.mkdtemp(prefix="distill-served-bench-"))
    identity = cache_identity(source, teacher, tokenizer, used)
    write_cache(
        teacher, used, root / "cache", identity=identity, k=args.k, dtype="float32",
        batch_size=args.batch, temperatures=[1.0],
    )  # fmt: skip
    port = free_port()
    server = start_server(port)
    try:
        remote = RemoteTeacher(
            f"http://127.0.0.1:{port}", vocab_rows=vocab, top_k=args.k,
            rows_per_request=args.batch, concurrency=1, timeout_s=300.0,
        )  # fmt: skip
        remote.check_server(teacher_rows=vocab, tokens=len(tokenizer))
        teachers = {
            "served": remote,
            "cache": CachedTeacher(root / "cache"),
            "live": LiveTeacher(teacher),
        }
        histories = {}
        for name, run_teacher in teachers.items():
            torch.manual_seed(config.seed)
            state = train(
                CausalLMTask(
                    copy.deepcopy(student),
                    run_teacher,
                    BlockBatches(train_blocks, args.batch, config.seed),
                    config.loss,
                    vocab_rows=vocab,
                ),
                config.train,
                description=name,
            )
            histories[name] = state.history
        timing = step_timing(
            student,
            teachers,
            used[: args.batch],
            args.timing_reps,
            vocab,
            LossConfig(temperature=1.0),
        )
        remote.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    final = {name: history[-1]["loss"] for name, history in histories.items()}
    rel_diff = abs(final["served"] - final["cache"]) / abs(final["cache"])
    stats = {name: spread(values) for name, values in timing.items()}
    overhead = stats["served"]["median"] / stats["cache"]["median"]
    print_table(
        [(n, f"{final[n]:.6f}", f"{stats[n]['median']:.3f}", f"{stats[n]['min']:.3f}") for n in final],
        ("teacher", "final loss", "step s (median)", "step s (min)"),
    )  # fmt: skip
    print(f"\nserved vs cache final loss rel diff {rel_diff:.2e}; served/cache step {overhead:.2f}")
    path = merge_results(
        "served_teacher",
        "served",
        {
            "setup": {
                "teacher": "SmolLM2-135M-Instruct (30 layers) behind distill serve-teacher",
                "student_layers": 15,
                "steps": args.steps,
                "batch": args.batch,
                "block": args.block,
                "k": args.k,
                "loss": config.loss.model_dump(),
                "cache_dtype": "float32",
                "server": "separate process on 127.0.0.1, same cores as the trainer",
            },
            "loss_history": {n: [r["loss"] for r in h] for n, h in histories.items()},
            "final_loss": final,
            "step_seconds_alternated": timing,
            "step_seconds": stats,
        },
        [
            target("served_vs_cache_final_loss_rel_diff", rel_diff, 1e-6, "lower"),
            target("served_step_overhead", overhead, 1.5, "lower"),
        ],
    )
    print(f"wrote {path}")


# --- the multi-teacher arm ----------------------------------------------------------------------


def prompt_texts(tokenizer) -> list[str]:
    """The shipped prompts as text: rendered by the chat template with the assistant's
    generation prompt (the teacher's domain of use), or their contents without a template."""
    texts = []
    for row in read_rows(default_prompts_path()):
        messages = row["messages"]
        if getattr(tokenizer, "chat_template", None):
            texts.append(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        else:
            texts.append("\n".join(message["content"] for message in messages))
    return texts


def domains(tokenizer) -> dict[str, list[str]]:
    """Each teacher's documents: the prompts (variant), as many characters of pydoc (base)."""
    prompts = prompt_texts(tokenizer)
    budget, base = sum(len(text) for text in prompts), []
    for document in default_documents():
        if sum(len(text) for text in base) >= budget:
            break
        base.append(document)
    return {"base": base, "variant": prompts}


def fine_tune(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, vocab: int):
    """``model`` trained in place on ``blocks`` (next-token cross-entropy, the one loop)."""
    task = CausalLMTask(
        model, None, BlockBatches(blocks, batch, seed=1), LossConfig(alpha=1.0), vocab_rows=vocab
    )
    settings = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=1)
    return train(task, settings, description="variant").history


def kl_to(teacher, students: dict, blocks: torch.Tensor, vocab: int) -> dict[str, float]:
    """KL(teacher || student) per token of each student on ``blocks``."""
    scores = heldout_metrics(
        students, LiveTeacher(teacher, vocab), blocks, vocab_rows=vocab, batch_size=4,
        progress=False,
    )  # fmt: skip
    return {name: scores[name]["kl_to_teacher"] for name in students}


def multi_arm(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="distill-multi-bench-"))
    try:
        results = run_multi(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["seconds"]["total"] = time.perf_counter() - started
    ratios = {name: row["ratio"] for name, row in results["kl"].items()}
    print_table(
        [(n, f"{r['heldout_before']:.4f}", f"{r['heldout_after']:.4f}", f"{r['ratio']:.2f}",
          f"{r['train_before']:.4f}", f"{r['train_after']:.4f}") for n, r in results["kl"].items()],
        ("teacher", "held-out KL before", "after", "before/after", "train KL before", "after"),
    )  # fmt: skip
    print(f"\nvariant vs base KL on the prompts: {results['variant_vs_base_kl']:.4f}; "
          f"seconds {json.dumps({k: round(v) for k, v in results['seconds'].items()})}")  # fmt: skip
    drop = target("multi_teacher_each_kl_drop", min(ratios.values()), 1.2, "higher")
    print(f"multi_teacher_each_kl_drop {drop['value']:.3f} (target >= 1.2: "
          f"{'met' if drop['met'] else 'missed'})")  # fmt: skip
    if args.tiny:
        print("--tiny: a self-check on random models; nothing written")
        return
    path = merge_results("served_teacher", "multi_teacher", results, [drop])
    print(f"wrote {path}")


def run_multi(args: argparse.Namespace, root: Path) -> dict:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    source = tiny_teacher(root / "base") if args.tiny else default_teacher_path()
    tokenizer = load_tokenizer(source)
    base = load_causal_lm(source)
    vocab = base.get_output_embeddings().weight.shape[0]
    seconds["load"] = time.perf_counter() - start

    # Each domain split here: its held-out documents never reach the run's data file.
    texts, heldout = {}, {}
    for name, documents in domains(tokenizer).items():
        texts[name], held = split_documents(documents, 0.15)
        heldout[name] = pack_documents(held, tokenizer, args.block)[: args.heldout]
    data = root / "rows.jsonl"
    rows = [{"text": t} for t in texts["base"]]
    rows += [{"text": t, "teacher": "variant"} for t in texts["variant"]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    student = {"search": "none", "keep_first": 1 if args.tiny else 8, "keep_last": 1 if args.tiny else 7}  # fmt: skip
    config = {
        "name": "multi",
        "output_dir": str(root / "runs"),
        "teacher": {"path": str(source)},
        "teachers": [
            {"name": "base", "path": str(source)},
            {"name": "variant", "path": str(root / "variant")},
        ],
        "student": student,
        "data": {"path": str(data), "block_size": args.block, "heldout_fraction": 0.05},
        "loss": {"temperature": 1.0, "alpha": args.alpha},
        "train": {"steps": args.multi_steps, "batch_size": args.batch, "device": "cpu"},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"max_blocks": args.heldout, "batch_size": 4, "speed": False,
                 "sample_prompts": 0, "every": 0, "extra_data": []},
    }  # fmt: skip
    routed = prepare_training_data(load_config(base=config), tokenizer)
    train_rows = {name: routed.train[routed.routes == i] for i, name in enumerate(["base", "variant"])}  # fmt: skip

    start = time.perf_counter()
    variant = copy.deepcopy(base)
    tuning = fine_tune(variant, train_rows["variant"], args.finetune_steps, args.batch,
                       args.finetune_lr, vocab)  # fmt: skip
    variant.save_pretrained(root / "variant", safe_serialization=True)
    tokenizer.save_pretrained(root / "variant")
    seconds["fine_tune"] = time.perf_counter() - start
    variant_vs_base = heldout_metrics(
        {"base": base}, LiveTeacher(variant, vocab), heldout["variant"], vocab_rows=vocab,
        batch_size=4, progress=False,
    )["base"]["kl_to_teacher"]  # fmt: skip

    start = time.perf_counter()
    result = distill(config)
    seconds["distill_run"] = time.perf_counter() - start
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())

    start = time.perf_counter()
    students = {
        "before": make_student(base, StudentConfig(**student)).model.eval(),
        "after": result.student.eval(),
    }
    kl = {}
    for name, teacher in (("base", base), ("variant", variant)):
        held = kl_to(teacher, students, heldout[name], vocab)
        seen = kl_to(teacher, students, train_rows[name][: args.heldout], vocab)
        kl[name] = {
            "heldout_blocks": int(heldout[name].shape[0]),
            "heldout_before": held["before"],
            "heldout_after": held["after"],
            "ratio": held["before"] / held["after"],
            "train_before": seen["before"],
            "train_after": seen["after"],
            "train_rows": int(train_rows[name].shape[0]),
        }
    seconds["measure"] = time.perf_counter() - start
    return {
        "setup": {
            "teacher": "tiny random Llama (--tiny)" if args.tiny else "SmolLM2-135M-Instruct",
            "variant": f"the teacher fine-tuned {args.finetune_steps} steps (lr "
            f"{args.finetune_lr}, batch {args.batch} x {args.block}) on the prompts' training rows",
            "student": student,
            "steps": args.multi_steps,
            "batch": args.batch,
            "block": args.block,
            "loss": config["loss"],
            "heldout": "15% of each domain's documents, never in the run's data",
        },
        "variant_fine_tune_loss": [r["loss"] for r in tuning],
        "variant_vs_base_kl": variant_vs_base,
        "kl": kl,
        "teachers_first_step": metrics[0].get("teachers"),
        "teachers_last_step": metrics[-1].get("teachers"),
        "plan_teachers": evaluation["plan"].get("teachers"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arm", choices=("served", "multi"), default="served")
    parser.add_argument("--steps", type=int, default=5, help="served: training steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--timing-reps", type=int, default=5)
    parser.add_argument("--multi-steps", type=int, help="multi: distillation steps (40; tiny 6)")
    parser.add_argument("--finetune-steps", type=int, help="multi: variant's steps (8; tiny 2)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="multi: variant's lr")
    parser.add_argument("--alpha", type=float, default=0.5, help="multi: the run's loss.alpha")
    parser.add_argument("--heldout", type=int, default=8, help="multi: blocks scored per teacher")
    parser.add_argument("--tiny", action="store_true", help="multi: tiny random models, no write")
    args = parser.parse_args()
    if args.tiny and args.arm != "multi":
        parser.error("--tiny is a self-check of --arm multi")
    args.multi_steps = args.multi_steps or (6 if args.tiny else 40)
    args.finetune_steps = args.finetune_steps or (2 if args.tiny else 8)
    served_arm(args) if args.arm == "served" else multi_arm(args)


if __name__ == "__main__":
    main()
