"""Students from the default teacher: fixed vs searched layers vs width pruning, before and after
an equal, short logit-KD budget, plus the recommended student with intermediate-layer losses.

Teacher: the embedded SmolLM2-135M (30 layers); corpus: the default (pydoc topics); 15-layer
students (or the same parameter count by width pruning: all 30 layers, MLP 1536 -> 512).
Held-out metrics on the first ``--eval-blocks`` held-out blocks, teacher log-probs computed once.
The teacher's training logits are computed once per batch and reused by every candidate (the
same data order for all). Targets: searched_vs_every_other_kl_before (best searched 15-layer KL /
every-other-layer KL, before training, <= 0.5) and recommended_vs_spine_kl_after (greedy_kl
student / first-8 + last-7 student, after the same steps, < 1.0).

    python benchmarks/students.py [--steps 8] [--batch 2] [--eval-blocks 3]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import print_table, target, write_results  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distill.config import IntermediateConfig, LossConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.data import (  # noqa: E402
    BlockBatches,
    default_documents,
    pack_documents,
    split_documents,  # noqa: E402
)
from distill.models import (  # noqa: E402
    count_params,
    default_teacher_path,
    load_causal_lm,
    load_tokenizer,  # noqa: E402
)
from distill.student import (  # noqa: E402
    build_student,
    calibration_blocks,
    search_layers,
    select_layers,  # noqa: E402
)
from distill.student.intermediate import IntermediateDistiller  # noqa: E402
from distill.student.width import WidthTargets, measure_importance, prune_width  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402
from distill.train import CausalLMTask, train  # noqa: E402
from distill.train.causal_lm import labels_for, student_logits  # noqa: E402


class MemoTeacher:
    """The live teacher's logits, computed once per distinct batch and kept (bfloat16)."""

    def __init__(self, live: LiveTeacher):
        self.live, self.vocab_rows, self.memo = live, live.vocab_rows, {}

    def soft_targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        key = input_ids.numpy().tobytes()
        if key not in self.memo:
            self.memo[key] = self.live.logits(input_ids).bfloat16()
        return self.memo[key].float()


class HeldOut:
    """Held-out blocks with the teacher's log-probs cached once; scores any model."""

    def __init__(self, teacher, blocks: torch.Tensor, vocab: int):
        self.blocks, self.vocab = blocks, vocab
        with torch.no_grad():
            self.teacher = [
                F.log_softmax(teacher(b[None]).logits[0, :-1, :vocab].float(), dim=-1)
                for b in blocks
            ]  # per block (T-1, V)

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        nll = kl = agree = n = 0.0
        model.eval()
        for block, teacher in zip(self.blocks, self.teacher, strict=True):
            logits = student_logits(model, block[None], self.vocab)[0, :-1]  # (T-1, V)
            logprobs = F.log_softmax(logits.double(), dim=-1)
            t = teacher.double()
            labels = labels_for(block[None])[0, :-1]
            nll -= float(logprobs.gather(1, labels[:, None]).sum())
            kl += float((t.exp() * (t - logprobs)).sum())
            agree += float((logprobs.argmax(-1) == t.argmax(-1)).sum())
            n += labels.numel()
        return {
            "perplexity": math.exp(nll / n),
            "kl_to_teacher": kl / n,
            "top1_agreement": agree / n,
        }


def width_student(teacher, calibration: torch.Tensor, ffn: int):
    importance = measure_importance(teacher, calibration)
    return prune_width(teacher, importance, WidthTargets(ffn=ffn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=4, help="calibration blocks")
    parser.add_argument("--search-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    path = default_teacher_path()
    teacher = load_causal_lm(path)
    tokenizer = load_tokenizer(path)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    train_docs, heldout_docs = split_documents(default_documents(), 0.1)
    train_blocks = pack_documents(train_docs, tokenizer, args.block)
    heldout = HeldOut(
        teacher, pack_documents(heldout_docs, tokenizer, args.block)[: args.eval_blocks], vocab
    )
    calibration = calibration_blocks(train_blocks, args.calibration, args.seed)
    n_layers = teacher.config.num_hidden_layers

    layer_sets: dict[str, list[int]] = {
        "every_other": select_layers(n_layers, StudentConfig(every_k=2)),
        "spine_first8_last7": select_layers(n_layers, StudentConfig()),
    }
    search_seconds = {}
    for method in ("shortgpt", "angular", "greedy_kl"):
        begin = time.perf_counter()
        layer_sets[method] = search_layers(
            teacher, calibration[:, : args.search_tokens], args.layers, method
        )
        search_seconds[method] = time.perf_counter() - begin
        print(f"{method}: {layer_sets[method]} ({search_seconds[method]:.0f} s)", flush=True)

    students = {name: build_student(teacher, layers) for name, layers in layer_sets.items()}
    # Same parameter count as a 15-layer student, all 30 layers kept: MLP width f solves
    # n_layers * (layer - 3 H F + 3 H f) = 15 * layer.
    layer_params = sum(p.numel() for p in teacher.model.layers[0].parameters())
    hidden, inter = teacher.config.hidden_size, teacher.config.intermediate_size
    ffn = round(
        (args.layers * layer_params - n_layers * (layer_params - 3 * hidden * inter))
        / (3 * hidden * n_layers)
    )
    students["width_ffn"] = width_student(teacher, calibration, ffn)
    torch.manual_seed(args.seed)
    students["random_init"] = AutoModelForCausalLM.from_config(
        students["spine_first8_last7"].config
    )
    before = {name: heldout.score(model) for name, model in students.items()}
    for name, metrics in before.items():
        print(f"before {name}: {metrics}", flush=True)

    searched = {m: before[m]["kl_to_teacher"] for m in ("shortgpt", "angular", "greedy_kl")}
    best_search = min(searched, key=searched.get)
    memo = MemoTeacher(LiveTeacher(teacher, vocab))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch, warmup_steps=1)
    trained = ["random_init", "every_other", "spine_first8_last7", "width_ffn", "greedy_kl"]
    if best_search != "greedy_kl":
        trained.append(best_search)
    after, train_seconds = {}, {}
    for name in trained:
        begin = time.perf_counter()
        train(
            CausalLMTask(
                students[name],
                memo,
                BlockBatches(train_blocks, args.batch, args.seed),
                LossConfig(),
                vocab_rows=vocab,
            ),
            train_config,
        )
        train_seconds[name] = time.perf_counter() - begin
        after[name] = heldout.score(students[name])
        print(f"after {name}: {after[name]} ({train_seconds[name]:.0f} s)", flush=True)

    # The recommended student again, with intermediate-layer losses added (cosine hidden-state
    # loss on every kept layer, attention KL on the last layer).
    name = "greedy_kl+intermediate"
    student = build_student(teacher, layer_sets["greedy_kl"])
    before[name] = before["greedy_kl"]
    intermediate = IntermediateConfig(hidden_weight=1.0, hidden_loss="cosine", attention_weight=1.0)
    distiller = IntermediateDistiller(student, teacher, intermediate, layer_sets["greedy_kl"])
    begin = time.perf_counter()
    state = train(
        CausalLMTask(
            student,
            memo,
            BlockBatches(train_blocks, args.batch, args.seed),
            LossConfig(),
            vocab_rows=vocab,
            extra_terms=distiller,
        ),
        train_config,
    )
    distiller.remove()
    train_seconds[name] = time.perf_counter() - begin
    after[name] = heldout.score(student)
    print(f"after {name}: {after[name]} ({train_seconds[name]:.0f} s)", flush=True)

    params = {name: count_params(model) for name, model in students.items()}
    params[name] = count_params(student)
    rows = []
    for key in before:
        b, a = before[key], after.get(key)
        rows.append(
            (
                key,
                f"{params[key] / 1e6:.1f}M",
                f"{b['kl_to_teacher']:.2f}",
                f"{b['perplexity']:.3g}",
                f"{b['top1_agreement']:.3f}",
                f"{a['kl_to_teacher']:.2f}" if a else "-",
                f"{a['perplexity']:.3g}" if a else "-",
                f"{a['top1_agreement']:.3f}" if a else "-",
            )
        )
    print_table(
        rows,
        (
            "student",
            "params",
            "KL before",
            "ppl before",
            "top1 before",
            "KL after",
            "ppl after",
            "top1 after",
        ),
    )
    teacher_ppl = heldout.score(teacher)["perplexity"]
    targets = [
        target(
            "searched_vs_every_other_kl_before",
            searched[best_search] / before["every_other"]["kl_to_teacher"],
            0.5,
            "lower",
        ),
        target(
            "recommended_vs_spine_kl_after",
            after["greedy_kl"]["kl_to_teacher"] / after["spine_first8_last7"]["kl_to_teacher"],
            1.0,
            "lower",
        ),
    ]
    for t in targets:
        print(f"{t['name']} = {t['value']:.3f} (target {t['target']}, met: {t['met']})")
    path = write_results(
        "students",
        {
            "targets": targets,
            "settings": vars(args)
            | {"width_ffn": ffn, "lr": train_config.lr, "tokens_per_step": args.batch * args.block},
            "teacher_perplexity": teacher_ppl,
            "layers": layer_sets,
            "best_search": best_search,
            "search_seconds": search_seconds,
            "train_seconds": train_seconds,
            "params": params,
            "before": before,
            "after": after,
            "intermediate": intermediate.model_dump() | {"last_record": state.history[-1]},
            "total_seconds": time.perf_counter() - start,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
