"""Cross-tokenizer distillation: a student with an 8k vocabulary of its own, four arms of equal
steps, compared per byte of held-out text.

Teacher: the embedded SmolLM2-135M (49,152 tokens). Student: its first 8 + last 7 layers
(``StudentConfig(search="none")``) with a ``--vocab`` (8192) byte-level BPE vocabulary trained on
the training split of the default corpus (``student.tokenizer.train_vocab``; rows initialised
from the teacher's, ``resize_vocabulary``). Every arm starts from that same student and trains
``--steps`` steps of ``--batch`` x ``--block`` student tokens on the same rows in the same order
(``steps x batch`` training blocks drawn once by seed; the same ``batch_order`` for every arm):

- ``labels_only``: the student's own next tokens (``loss.alpha=1``);
- ``sequence_kd``: ``loss.alpha=1`` on text the teacher wrote: each row's first quarter (its
  prefix, decoded to text) continued by the teacher (T = 0.7, top-p 0.9, the defaults of
  ``distill generate``) to as many bytes as the row holds, re-tokenized for the student (labels
  on the prefix and the continuation; a row that ends early is padded, padding never a target).
  Cost: ``steps x batch`` continuations of at most ``ceil(1.15 x r x (block - prefix)) + 4``
  teacher tokens, ``r`` the teacher's tokens per student token on the training text; the
  seconds are reported;
- ``uld`` and ``hybrid``: ``loss.cross_tokenizer`` with the live teacher, T 1, ``uld_top_k``
  256, and the alpha of ``--alphas`` (0.25, 0.5, 0.75) whose student scores the lowest bits per
  byte on the validation text: each alpha trains its own copy, every score is reported.

The KD settings and the best KD arm are chosen on a **validation** part of the training split
(``--validation-fraction`` of its documents by content hash, never trained on, its own vocabulary
not trained on it either; ``--validation-bytes`` of pieces scored), never on the held-out text
the targets are computed from.

Measured on text no arm trained on: bits per UTF-8 byte (``distill.evaluate.bits_per_byte``) of
the held-out documents (``--bpb-bytes`` of pieces, evenly spread) for the teacher, the initial
student and every arm, each with its own tokenizer; the same on a numeral-heavy slice written by
:func:`numeral_documents` (code with constants, CSV and Markdown tables, checked arithmetic;
generated from a seed, never trained on), reported separately; the teacher's bits per byte of
each model's samples (``--samples`` held-out prefixes, ``--sample-tokens`` tokens, T = 1).

Targets (benchmarks/results/cross_tokenizer.json):

- ``best_kd_vs_labels_only_bits_per_byte``: the best KD arm's held-out bits per byte / the
  labels-only arm's, below 0.95;
- ``hybrid_vs_uld_bits_per_byte``: hybrid / ULD held-out bits per byte, at most 1.0;
- ``numerals_kd_vs_labels_only_bits_per_byte``: the same best KD arm / labels only, on the
  numeral slice, at most 1.0.

The best KD arm is the one of lowest validation bits per byte.

    python benchmarks/cross_tokenizer.py [--steps 40] [--batch 4] [--block 128] [--vocab 8192]
        [--alphas 0.25,0.5,0.75] [--threads 0]
    python benchmarks/cross_tokenizer.py --tiny   # a self-check on tiny random models, no write
"""

from __future__ import annotations

import argparse
import copy
import math
import operator
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import print_table, target, tiny_teacher, write_results  # noqa: E402

from distill.config import GenerateConfig, LossConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.data import default_documents, pack_documents, split_documents  # noqa: E402
from distill.data.examples import Examples  # noqa: E402
from distill.evaluate.bits_per_byte import (  # noqa: E402
    bits_per_byte,
    teacher_bits_per_byte_of_samples,
    text_pieces,
)
from distill.losses import IGNORE_INDEX  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.sampling import Sampling, sample_continuations  # noqa: E402
from distill.student import build_vocabulary, make_student, resize_vocabulary  # noqa: E402
from distill.train.cross_tokenizer import train_cross_tokenizer  # noqa: E402

ARMS = ("labels_only", "sequence_kd", "uld", "hybrid")
KD_ARMS = ("sequence_kd", "uld", "hybrid")
CROSS_ARMS = ("uld", "hybrid")  # their alpha is chosen on the validation text
HELDOUT_FRACTION = 0.05  # data.heldout_fraction's default
GENERATION_BATCH = 32  # teacher continuations per generate call (fewer calls: less overhead)


# --- the numeral-heavy slice ---------------------------------------------------------------------

WORDS = [
    "alpha",
    "beta",
    "cache",
    "delay",
    "depth",
    "entry",
    "frame",
    "gain",
    "grid",
    "limit",
    "mode",
    "offset",
    "page",
    "port",
    "queue",
    "rate",
    "ratio",
    "scale",
    "seed",
    "size",
    "slot",
    "step",
    "tile",
    "timeout",
    "width",
    "worker",
    "year",
    "zone",
]


OPERATORS = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "//": operator.floordiv,
    "%": operator.mod,
}


def _name(rng: random.Random, upper: bool = False) -> str:
    name = "_".join(rng.sample(WORDS, 2))
    return name.upper() if upper else name


def _constants(rng: random.Random) -> str:
    """A Python module of constants: ints, floats, hex masks, lists and a derived total."""
    lines = [f'"""Settings of the {_name(rng)} service."""', ""]
    values = []
    for _ in range(rng.randint(6, 10)):
        value = rng.choice([rng.randint(2, 99999), round(rng.uniform(0, 1000), rng.randint(1, 4))])
        values.append(value)
        lines.append(f"{_name(rng, upper=True)} = {value}")
    mask = rng.getrandbits(16)
    lines.append(f"{_name(rng, upper=True)}_MASK = 0x{mask:04X}  # {mask}")
    ports = sorted(rng.sample(range(1024, 65536), 4))
    lines.append(f"{_name(rng, upper=True)}S = {ports}")
    lines.append(f"TOTAL = {sum(ports)}  # sum of the {len(ports)} ports above")
    return "\n".join(lines) + "\n"


def _csv(rng: random.Random) -> str:
    """A CSV table whose last column is computed from the others (area = width x height)."""
    rows = ["id,width,height,area,ratio"]
    for index in range(rng.randint(8, 14)):
        width, height = rng.randint(1, 4096), rng.randint(1, 4096)
        rows.append(f"{1000 + index},{width},{height},{width * height},{width / height:.4f}")
    return "\n".join(rows) + "\n"


def _markdown(rng: random.Random) -> str:
    """A Markdown table of yearly counts and their change in percent."""
    year, count = rng.randint(1990, 2015), rng.randint(500, 90000)
    rows = [f"| year | {_name(rng)} | change |", "|---|---|---|"]
    for _ in range(rng.randint(5, 9)):
        new = max(1, int(count * rng.uniform(0.7, 1.4)))
        rows.append(f"| {year} | {new:,} | {100 * (new - count) / count:+.1f}% |")
        year, count = year + 1, new
    return "\n".join(rows) + "\n"


def _arithmetic(rng: random.Random) -> str:
    """Checked arithmetic in code: every assertion holds."""
    lines = [f"def test_{_name(rng)}():"]
    for _ in range(rng.randint(5, 9)):
        a, b = rng.randint(2, 9999), rng.randint(2, 999)
        op = rng.choice(list(OPERATORS))
        lines.append(f"    assert {a} {op} {b} == {OPERATORS[op](a, b)}")
    return "\n".join(lines) + "\n"


def numeral_documents(count: int, seed: int = 1234) -> list[str]:
    """``count`` numeral-heavy documents, the same for the same seed (written here, not copied):
    constants modules, CSV and Markdown tables, checked arithmetic, in turn."""
    rng = random.Random(seed)
    writers = (_constants, _csv, _markdown, _arithmetic)
    return [writers[index % len(writers)](rng) for index in range(count)]


# --- models and data -------------------------------------------------------------------------------


def draw_training_rows(blocks: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` training blocks ``[count, T]`` drawn once by ``seed`` from all of them: every arm
    trains one pass over exactly these."""
    if count > blocks.shape[0]:
        raise SystemExit(f"{count} rows wanted, only {blocks.shape[0]} training blocks")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order[:count]]


def tokens_per_token(texts: list[str], teacher_tokenizer, student_tokenizer) -> float:
    """The teacher's tokens per student token on ``texts``."""
    teacher = sum(len(ids) for ids in teacher_tokenizer(texts, add_special_tokens=False)["input_ids"])  # fmt: skip
    student = sum(len(ids) for ids in student_tokenizer(texts, add_special_tokens=False)["input_ids"])  # fmt: skip
    return teacher / student


def teacher_written_rows(
    rows: torch.Tensor, teacher, teacher_tokenizer, student_tokenizer, ratio: float, seed: int
) -> tuple[Examples, dict]:
    """The sequence-KD arm's rows: row ``i`` is the first quarter of ``rows[i]`` (as text) and
    the teacher's continuation of it, in the student's tokens, cut to the block (``Examples``:
    padding after an early end, never a target). Returns them and what generating cost."""
    count, block = rows.shape
    prefix = max(1, block // 4)
    new_tokens = math.ceil(1.15 * ratio * (block - prefix)) + 4
    defaults = GenerateConfig()
    sampling = Sampling(new_tokens, defaults.temperature, defaults.top_p)
    eos = teacher_tokenizer.eos_token_id
    pad = student_tokenizer.pad_token_id
    pad = pad if pad is not None else student_tokenizer.eos_token_id
    input_ids = torch.full((count, block), pad, dtype=torch.long)
    labels = torch.full((count, block), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(count, dtype=torch.long)
    torch.manual_seed(seed)
    start, generated = time.perf_counter(), 0
    for first in range(0, count, GENERATION_BATCH):
        chunk = rows[first : first + GENERATION_BATCH]
        texts = [student_tokenizer.decode(row[:prefix].tolist()) for row in chunk]
        prompts = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
        prompts = [ids or [eos] for ids in prompts]
        written = sample_continuations(
            teacher, prompts, sampling, eos_token_id=eos, pad_token_id=eos
        )
        for offset, (text, ids) in enumerate(zip(texts, written, strict=True)):
            generated += len(ids)
            continuation = teacher_tokenizer.decode(ids, skip_special_tokens=True)
            tokens = student_tokenizer(text + continuation, add_special_tokens=False)["input_ids"]
            tokens = tokens[:block]
            index = first + offset
            input_ids[index, : len(tokens)] = torch.tensor(tokens)
            labels[index, : len(tokens) - 1] = torch.tensor(tokens[1:])
            lengths[index] = len(tokens)
        print(f"sequence KD: {first + len(chunk)}/{count} rows written", flush=True)
    examples = Examples(input_ids, labels, lengths, torch.zeros(count, dtype=torch.long))
    cost = {
        "rows": count,
        "prefix_student_tokens": prefix,
        "max_new_teacher_tokens": new_tokens,
        "teacher_tokens_generated": generated,
        "mean_row_tokens": float(lengths.float().mean()),
        "full_rows": int((lengths == block).sum()),
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p},
        "seconds": time.perf_counter() - start,
    }
    return examples, cost


def sample_prompts(pieces: list[str], count: int, chars: int = 96) -> list[str]:
    """``count`` prompts: the start of evenly spread pieces, cut at the last space."""
    step = max(1, len(pieces) // max(count, 1))
    prompts = []
    for piece in pieces[::step][:count]:
        head = piece[:chars]
        cut = head.rfind(" ")
        prompts.append(head[:cut] if cut > chars // 2 else head)
    return prompts


# --- the benchmark ---------------------------------------------------------------------------------


def train_arm(initial, name: str, loss: LossConfig, teacher, data, context: dict) -> tuple:
    """A copy of ``initial`` trained on ``data`` with ``loss`` (``teacher`` None: labels only):
    the student, its loss history and seconds."""
    start = time.perf_counter()
    student = copy.deepcopy(initial).train()
    state = train_cross_tokenizer(
        student, context["student_tokenizer"], teacher, context["teacher_tokenizer"], data, loss,
        context["schedule"], seed=context["seed"], description=name,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    history = [
        {key: record[key] for key in ("step", "loss", "ce", "divergence")}
        for record in state.history
    ]
    print(f"{name}: {seconds:.0f} s, final loss {history[-1]['loss']:.4f}", flush=True)
    return student.eval(), history, seconds


def run(args: argparse.Namespace, root: Path) -> dict:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    source = tiny_teacher(root / "teacher") if args.tiny else default_teacher_path()
    teacher_tokenizer = load_tokenizer(source)
    teacher = load_causal_lm(source).eval()
    documents = default_documents()
    train_texts, held_texts = split_documents(documents, HELDOUT_FRACTION)
    train_texts, validation_texts = split_documents(train_texts, args.validation_fraction)
    student_tokenizer = build_vocabulary(train_texts, args.vocab, teacher_tokenizer)
    layers = {"search": "none"} | ({"keep_first": 1, "keep_last": 1} if args.tiny else {})
    built = make_student(teacher, StudentConfig(**layers))
    initial = built.model
    rows_from = resize_vocabulary(initial, teacher_tokenizer, student_tokenizer)
    initial.eval()
    blocks = pack_documents(train_texts, student_tokenizer, args.block)
    rows = draw_training_rows(blocks, args.steps * args.batch, args.seed)
    ratio = tokens_per_token(train_texts[:200], teacher_tokenizer, student_tokenizer)
    validation = text_pieces(validation_texts, args.validation_bytes, 4 * args.block)
    validation_bpb = {
        name: bits_per_byte(model, tokenizer, validation)["bits_per_byte"]
        for name, model, tokenizer in (
            ("teacher", teacher, teacher_tokenizer), ("initial", initial, student_tokenizer)
        )
    }  # fmt: skip
    seconds["setup"] = time.perf_counter() - start
    print(f"student layers {built.layers}, vocabulary {len(student_tokenizer)} "
          f"({rows_from}); {ratio:.3f} teacher tokens per student token", flush=True)  # fmt: skip

    start = time.perf_counter()
    written, generation = teacher_written_rows(
        rows, teacher, teacher_tokenizer, student_tokenizer, ratio, args.seed
    )
    seconds["sequence_kd_generation"] = time.perf_counter() - start

    schedule = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        warmup_steps=max(1, args.steps // 10),
        device="cpu",
    )
    context = {
        "student_tokenizer": student_tokenizer,
        "teacher_tokenizer": teacher_tokenizer,
        "schedule": schedule,
        "seed": args.seed,
    }
    setups = {
        "labels_only": (LossConfig(alpha=1.0), None, rows),
        "sequence_kd": (LossConfig(alpha=1.0), None, written),
    }
    for kind in CROSS_ARMS:
        for alpha in args.alphas:
            loss = LossConfig(cross_tokenizer=kind, alpha=alpha, temperature=1.0)
            setups[f"{kind}_alpha_{alpha:g}"] = (loss, teacher, rows)
    students, history = {}, {}
    for name, (loss, arm_teacher, data) in setups.items():
        student, history[name], seconds[f"train_{name}"] = train_arm(
            initial, name, loss, arm_teacher, data, context
        )
        validation_bpb[name] = bits_per_byte(student, student_tokenizer, validation)[
            "bits_per_byte"
        ]
        print(f"{name}: validation {validation_bpb[name]:.4f} bits/byte", flush=True)
        students[name] = student
    chosen = {}
    for kind in CROSS_ARMS:  # the alpha of lowest validation bits per byte becomes the arm
        candidates = [name for name in setups if name.startswith(f"{kind}_alpha_")]
        best = min(candidates, key=validation_bpb.__getitem__)
        chosen[kind] = {"candidate": best, "alpha": setups[best][0].alpha}
        students[kind], history[kind] = students[best], history[best]
        for name in candidates:
            del students[name]
    losses = {arm: setups[chosen[arm]["candidate"] if arm in chosen else arm][0] for arm in ARMS}

    start = time.perf_counter()
    piece_chars = 4 * args.block
    texts = {
        "heldout": text_pieces(held_texts, args.bpb_bytes, piece_chars),
        "numerals": text_pieces(
            numeral_documents(args.numeral_documents), args.bpb_bytes // 2, piece_chars
        ),  # fmt: skip
    }
    models = {"teacher": (teacher, teacher_tokenizer), "initial": (initial, student_tokenizer)}
    models |= {arm: (model, student_tokenizer) for arm, model in students.items()}
    scores: dict[str, dict[str, float]] = {name: {} for name in models}
    for set_name, pieces in texts.items():
        for name, (model, tokenizer) in models.items():
            scored = bits_per_byte(model, tokenizer, pieces)
            scores[name][f"{set_name}_bpb"] = scored["bits_per_byte"]
            scores[name][f"{set_name}_tokens"] = scored["tokens"]
        prompts = sample_prompts(pieces, args.samples)
        samples = teacher_bits_per_byte_of_samples(
            models, teacher, teacher_tokenizer, prompts,
            new_tokens=args.sample_tokens, seed=args.seed,
        )  # fmt: skip
        for name, value in samples.items():
            scores[name][f"{set_name}_teacher_sample_bpb"] = value["teacher_sample_bpb"]
            scores[name][f"{set_name}_sample_bytes"] = value["sample_bytes"]
    seconds["evaluate"] = time.perf_counter() - start
    return {
        "setup": {
            "teacher": "tiny random Llama (--tiny)" if args.tiny else "SmolLM2-135M-Instruct",
            "teacher_tokens": len(teacher_tokenizer),
            "student_layers": built.layers,
            "student_tokens": len(student_tokenizer),
            "student_rows_from_teacher": rows_from,
            "teacher_tokens_per_student_token": ratio,
            "steps": args.steps,
            "batch": args.batch,
            "block": args.block,
            "train": schedule.model_dump(include={"lr", "warmup_steps", "min_lr_ratio"}),
            "losses": {
                arm: losses[arm].model_dump(
                    include={"alpha", "temperature", "cross_tokenizer", "uld_top_k"}
                )
                for arm in ARMS
            },  # fmt: skip
            "alphas": list(args.alphas),
            "validation": f"{args.validation_fraction:.0%} of the training documents (by content "
            f"hash), never trained on; {args.validation_bytes} bytes scored",
            "rows": "steps x batch training blocks (the student's tokens) drawn once by seed; "
            "every arm one pass over them in the same batch order",
            "heldout": f"{HELDOUT_FRACTION:.0%} of the default corpus' documents (by content "
            "hash), never trained on; numerals: numeral_documents() (generated, never trained on)",
            "bytes_scored": {
                name: sum(len(p.encode("utf-8")) for p in pieces) for name, pieces in texts.items()
            },
            "samples": {"prompts": args.samples, "new_tokens": args.sample_tokens},
            "threads": torch.get_num_threads(),
        },
        "sequence_kd_generation": generation,
        "validation_bpb": validation_bpb,
        "chosen_alpha": chosen,
        "models": scores,
        "history": history,
        "seconds": seconds,
    }


def report(results: dict) -> list[dict]:
    """Print the table and return the targets."""
    scores = results["models"]
    rows = [
        (
            name,
            f"{row['heldout_bpb']:.4f}",
            f"{row['numerals_bpb']:.4f}",
            f"{row['heldout_teacher_sample_bpb'] or float('nan'):.3f}",
            f"{row['numerals_teacher_sample_bpb'] or float('nan'):.3f}",
        )
        for name, row in scores.items()
    ]
    print_table(
        rows,
        ("model", "held-out bits/byte", "numerals bits/byte", "teacher bpb of samples",
         "(numeral prompts)"),
    )  # fmt: skip
    labels = scores["labels_only"]
    chosen = results["chosen_alpha"]
    validation = {  # each KD arm's validation bits per byte (uld / hybrid: at the chosen alpha)
        arm: results["validation_bpb"][chosen[arm]["candidate"] if arm in chosen else arm]
        for arm in KD_ARMS
    }
    best = min(KD_ARMS, key=validation.__getitem__)
    targets = [
        target(
            "best_kd_vs_labels_only_bits_per_byte",
            scores[best]["heldout_bpb"] / labels["heldout_bpb"],
            0.95,
            "lower",
        ),
        target(
            "hybrid_vs_uld_bits_per_byte",
            scores["hybrid"]["heldout_bpb"] / scores["uld"]["heldout_bpb"],
            1.0,
            "lower",
        ),
        target(
            "numerals_kd_vs_labels_only_bits_per_byte",
            scores[best]["numerals_bpb"] / labels["numerals_bpb"],
            1.0,
            "lower",
        ),
    ]
    results["best_kd_arm"] = best
    results["ratios_to_labels_only"] = {
        arm: {
            key: scores[arm][key] / labels[key]
            for key in ("heldout_bpb", "numerals_bpb", "heldout_teacher_sample_bpb")
            if scores[arm][key] and labels[key]
        }
        for arm in KD_ARMS
    }
    print("\nvalidation bits/byte: " + ", ".join(
        f"{name} {value:.4f}" for name, value in results["validation_bpb"].items()))  # fmt: skip
    print(f"best KD arm (validation bits/byte): {best}")
    for entry in targets:
        print(f"{entry['name']}: {entry['value']:.4f} (target {entry['target']}): "
              f"{'met' if entry['met'] else 'MISSED'}")  # fmt: skip
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (40; tiny 3)")
    parser.add_argument("--batch", type=int, help="rows per step (4; tiny 2)")
    parser.add_argument("--block", type=int, help="student tokens per row (128; tiny 32)")
    parser.add_argument("--vocab", type=int, help="the student's vocabulary (8192; tiny 300)")
    parser.add_argument("--bpb-bytes", type=int, help="held-out bytes scored (16384; tiny 1024)")
    parser.add_argument("--numeral-documents", type=int, default=48)
    parser.add_argument("--samples", type=int, help="sampling prompts per set (16; tiny 2)")
    parser.add_argument("--sample-tokens", type=int, default=48)
    parser.add_argument(
        "--alphas",
        type=lambda text: tuple(float(value) for value in text.split(",")),
        help="alpha grid of the uld / hybrid arms, chosen on validation (0.25,0.5,0.75; tiny "
        "0.25,0.75)",
    )
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument(
        "--validation-bytes", type=int, help="validation bytes scored (8192; tiny 1024)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, nothing written")
    args = parser.parse_args()
    for key, full, tiny in (("steps", 40, 3), ("batch", 4, 2), ("block", 128, 32),
                            ("vocab", 8192, 300), ("bpb_bytes", 16384, 1024),
                            ("samples", 16, 2), ("alphas", (0.25, 0.5, 0.75), (0.25, 0.75)),
                            ("validation_bytes", 8192, 1024)):  # fmt: skip
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="distill-cross-bench-"))
    try:
        results = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["seconds"]["total"] = time.perf_counter() - started
    targets = report(results)
    print(f"total {results['seconds']['total']:.0f} s")
    if args.tiny:
        print("--tiny: a self-check on random models; nothing written")
        return
    path = write_results("cross_tokenizer", {**results, "targets": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
