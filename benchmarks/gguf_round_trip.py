"""GGUF export round trip on a real student: how much of the student each GGUF type keeps.

``distill export --gguf TYPE`` writes the student for llama.cpp and checks the file by loading it
back through ``transformers``' GGUF loader on a few tokens. This measures the same round trip on
the default corpus' held-out blocks, for every type (F16, Q8_0, Q4_0, Q4_1), against the student
it was written from: KL(student || GGUF model) per token, top-1 and top-5 agreement, and the
relative max logit difference (max |difference| / max |logit|); and what the export's check
measures, the same difference against the student's weights put on the file's grid in memory
(targets: at most ``FILE_TOLERANCE``, whatever the grid costs). Two more rows: ``q4_1_min_to_max``, the student's decoder
weights on the ``gguf`` package's own Q4_1 grid (each block's minimum to its maximum, no exact
0; de-quantized in memory, not a file), which distill's Q4_1 writer replaces with its int4
grid; and a ``distill compress --quantize int4 --group-size 32`` student written as Q4_1 (the
same grid), against its own de-quantized weights: the share of its decoder weight groups that
the file changes (a group's grid recomputed from its de-quantized values differs only where
the zero shift left its top at a rounding tie); its int8 embedding is re-rounded to Q8_0.

Student: ``--student DIR`` (a trained student; the committed result used the default run's
student, see the JSON's ``setup``), else the default's searched 15 teacher layers, untrained.

    python benchmarks/gguf_round_trip.py [--student DIR] [--blocks 16] [--block-size 128]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import print_table, target, write_results  # noqa: E402

from distill.compress import QuantizeSpec, load_model, save_model  # noqa: E402
from distill.config import StudentConfig, load_config  # noqa: E402
from distill.evaluate.heldout import heldout_quality  # noqa: E402
from distill.export.gguf import (  # noqa: E402
    FILE_TOLERANCE,
    GGUF_TYPES,
    export_gguf,
    on_file_grid,
)
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.pipelines.training_data import prepare_data  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402


@torch.no_grad()
def relative_logit_error(reference, model, blocks: torch.Tensor, batch_size: int) -> float:
    """max |logits - reference logits| / max |reference logits| over ``blocks`` [n, T]."""
    largest_difference, largest_logit = 0.0, 0.0
    for batch in blocks.split(batch_size):  # [b, T]
        want = reference(input_ids=batch).logits
        got = model(input_ids=batch).logits
        largest_difference = max(largest_difference, float((got - want).abs().max()))
        largest_logit = max(largest_logit, float(want.abs().max()))
    return largest_difference / largest_logit


@torch.no_grad()
def groups_changed(model, other, group_size: int = 32) -> float:
    """Share of the decoder Linear weights' groups of ``group_size`` inputs that differ at all
    between two copies of a model."""
    others = dict(other.named_parameters())
    changed = total = 0
    for name, weight in model.named_parameters():
        if weight.ndim == 2 and ".layers." in name:
            differs = (others[name] != weight).reshape(weight.shape[0], -1, group_size).any(-1)
            changed, total = changed + int(differs.sum()), total + differs.numel()
    return changed / total


def on_gguf_q4_1_grid(student):
    """A copy of ``student`` whose decoder Linear weights went through the ``gguf`` package's
    Q4_1 quantizer and back (the embedding and head stay float)."""
    import gguf
    from gguf.quants import dequantize, quantize

    q4_1 = gguf.GGMLQuantizationType.Q4_1
    model = copy.deepcopy(student)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2 and ".layers." in name:
                data = weight.detach().numpy()
                weight.copy_(
                    torch.from_numpy(dequantize(quantize(data, q4_1), q4_1)).view_as(weight)
                )
    return model


def score(reference, models: dict, blocks: torch.Tensor, vocab: int, batch_size: int) -> dict:
    """Per model: agreement with ``reference`` (which stands where the teacher stands)."""
    quality = heldout_quality(
        models, LiveTeacher(reference, vocab), blocks, vocab_rows=vocab, batch_size=batch_size
    )
    return {
        name: {
            "kl_to_original": quality[name]["kl_to_teacher"],
            "top1_agreement": quality[name]["top1_agreement"],
            "top5_agreement": quality[name]["top5_agreement"],
            "perplexity": quality[name]["perplexity"],
            "relative_logit_error": relative_logit_error(reference, model, blocks, batch_size),
        }
        for name, model in models.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", help="trained float student directory (else untrained)")
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks scored")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    started = time.perf_counter()

    config = load_config(
        overrides=[f"data.block_size={args.block_size}", f"eval.max_blocks={args.blocks}"]
    )
    teacher_path = default_teacher_path()
    tokenizer = load_tokenizer(teacher_path)
    if args.student:
        student, source = load_causal_lm(args.student).eval(), f"given: {args.student}"
    else:
        teacher_model = load_causal_lm(teacher_path)
        layers = select_layers(teacher_model.config.num_hidden_layers, StudentConfig())
        student, source = build_student(teacher_model, layers).eval(), f"layers {layers}, untrained"
        del teacher_model
    vocab = student.config.vocab_size
    _, heldout = prepare_data(config, tokenizer)
    blocks = heldout[: args.blocks]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        files = {
            kind: export_gguf(student, tokenizer, root / f"{kind}.gguf", kind)
            for kind in GGUF_TYPES
        }
        sizes = {kind: path.stat().st_size for kind, path in files.items()}
        loaded = {kind: load_model(path).eval() for kind, path in files.items()}
        file_errors = {
            kind: relative_logit_error(on_file_grid(student, kind), loaded[kind], blocks, 4)
            for kind in GGUF_TYPES
        }
        loaded["q4_1_min_to_max"] = on_gguf_q4_1_grid(student)
        sizes["q4_1_min_to_max"] = sizes["q4_1"]
        rows = score(student, loaded, blocks, vocab, args.batch_size)
        del loaded
        # the int4 group-32 student and its Q4_1 file: the same grid, so no second rounding
        int4_dir = save_model(
            student, tokenizer, root / "int4_g32", quantize=QuantizeSpec("int4", 32)
        )
        int4 = load_model(int4_dir, dequantize=True).eval()
        q4_1 = export_gguf(int4, tokenizer, root / "int4_g32-q4_1.gguf", "q4_1")
        sizes["int4_g32_as_q4_1"] = q4_1.stat().st_size
        rows |= score(
            int4, {"int4_g32_as_q4_1": load_model(q4_1).eval()}, blocks, vocab, args.batch_size
        )
        decoder_change = groups_changed(int4, on_file_grid(int4, "q4_1"))

    print_table(
        [
            (
                name,
                f"{sizes[name] / 1e6:.1f}",
                f"{row['kl_to_original']:.5f}",
                f"{row['top1_agreement']:.4f}",
                f"{row['top5_agreement']:.4f}",
                f"{row['relative_logit_error']:.4f}",
                f"{file_errors[name]:.1e}" if name in file_errors else "",
            )
            for name, row in rows.items()
        ],
        ("GGUF", "MB", "KL to original", "top-1", "top-5", "rel. logit error", "file error"),
    )
    print(f"int4 group-32 decoder weight groups Q4_1 changes: {decoder_change:.2%}")
    # the file holds the grid it should, whatever that grid costs the student
    targets = [
        target(f"{kind}_file_logit_error", file_errors[kind], FILE_TOLERANCE, "lower")
        for kind in GGUF_TYPES
    ]
    # the same grid written again: a group changes only where rounding the grid again differs
    targets.append(target("int4_g32_q4_1_groups_changed", decoder_change, 0.01, "lower"))
    path = write_results(
        "gguf_round_trip",
        {
            "targets": targets,
            "seconds": time.perf_counter() - started,
            "setup": {
                "student": source,
                "heldout_blocks": int(blocks.shape[0]),
                "block_size": int(blocks.shape[1]),
                "loader": "transformers AutoModelForCausalLM (gguf_file=...), float32",
                "file_tolerance": FILE_TOLERANCE,
            },
            "models": {
                name: {"bytes": sizes[name], **row}
                | ({"file_logit_error": file_errors[name]} if name in file_errors else {})
                for name, row in rows.items()
            },
            "int4_g32_q4_1_groups_changed": decoder_change,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
