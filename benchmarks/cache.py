"""The offline teacher cache against the online teacher, on the default teacher and student.

Teacher: the embedded SmolLM2-135M (30 layers, V = 49152); student: its first 8 + last 7 layers;
default loss (the schema's: pure distillation, T = 1); ``--steps`` steps of 4 x 256 tokens. Only the blocks those
steps draw are cached (same order as the run). Measured in one run:

- bytes per token of the cache at k in {16, 64, 256} (shard bytes / tokens) against full float16
  logits (V x 2 bytes): ``cache_bytes_ratio_k64`` <= 1/300;
- KD step time (student forward + loss + backward + AdamW, the loop's own ``micro_batch_terms``)
  with the online teacher / from the k = 64 cache, timed alternately (A B A B ...) so that load
  from other processes hits both alike, ``--timing-reps`` pairs after one warm-up pair:
  ``cache_step_speedup`` (median of the pairs' ratios, their spread beside it) >= 1.3;
- held-out KL(teacher || student) (exact, full vocabulary) after the same steps on the same
  batches, from the k = 64 cache (tail-bucket loss) / online full-logit KD:
  ``cache_kl_ratio_k64`` <= 1.05 (the renormalised top-k loss is reported beside it).

    python benchmarks/cache.py [--steps 20] [--heldout 8] [--timing-reps 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    paired_ratio,
    print_table,
    step_timing,
    target,
    timed,
    write_results,
)

from distill.config import LossConfig, RunConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.data import BlockBatches  # noqa: E402
from distill.evaluate import heldout_metrics  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.pipelines.training_data import prepare_data  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import CachedTeacher, LiveTeacher  # noqa: E402
from distill.teacher.cache import read_manifest  # noqa: E402
from distill.teacher.cache_writer import cache_identity, write_cache  # noqa: E402
from distill.train import CausalLMTask, train  # noqa: E402


def write(teacher, source, tokenizer, blocks, directory: Path, k: int) -> dict:
    """Write a k cache of ``blocks``; its manifest plus the wall time."""
    identity = cache_identity(source, teacher, tokenizer, blocks)
    _, seconds = timed(
        lambda: write_cache(teacher, blocks, directory, identity=identity, k=k, shard_blocks=16)
    )
    return {**read_manifest(directory), "write_seconds": seconds}


def kept_mass(cache: CachedTeacher, blocks: torch.Tensor, temperature: float) -> float:
    """Mean teacher probability mass (at ``temperature``) on the cached top-k."""
    targets = cache.soft_targets(blocks)
    return float(targets.teacher_logprobs(temperature).exp().sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=8, help="held-out blocks for the KL")
    parser.add_argument("--timing-reps", type=int, default=5, help="timed step pairs")
    args = parser.parse_args()

    config = RunConfig(train=TrainConfig(steps=args.steps))
    source = default_teacher_path()
    tokenizer = load_tokenizer(source)
    teacher = load_causal_lm(source)
    student = build_student(teacher, select_layers(30, StudentConfig())).train()
    train_blocks, heldout_blocks = prepare_data(config, tokenizer)
    heldout_blocks = heldout_blocks[: args.heldout]
    batch = config.train.batch_size
    order = BlockBatches(train_blocks, batch, config.seed)
    used = torch.cat([order.next_batch() for _ in range(args.steps)])  # (steps * batch, 256)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    tokens = used.numel()

    root = Path(tempfile.mkdtemp(prefix="distill-cache-bench-"))
    manifests = {64: write(teacher, source, tokenizer, used, root / "k64", 64)}
    for k in (16, 256):  # bytes per token only: a few blocks suffice
        manifests[k] = write(teacher, source, tokenizer, used[: 2 * batch], root / f"k{k}", k)
    full_bytes = vocab * 2  # float16 logits per token
    cache = CachedTeacher(root / "k64")
    live = LiveTeacher(teacher)

    students = {"before": copy.deepcopy(student).eval()}
    histories = {}
    runs = {
        "online_full_logits": (live, LossConfig()),
        "cache_k64_tail_bucket": (cache, LossConfig(sparse="tail_bucket")),
        "cache_k64_renormalized": (cache, LossConfig(sparse="renormalized")),
    }
    for name, (run_teacher, loss_config) in runs.items():
        torch.manual_seed(config.seed)
        students[name] = copy.deepcopy(student)
        state = train(
            CausalLMTask(
                students[name],
                run_teacher,
                BlockBatches(train_blocks, batch, config.seed),
                loss_config,
                vocab_rows=vocab,
            ),
            config.train,
            description=name,
        )
        histories[name] = state.history
    quality = heldout_metrics(
        students, live, heldout_blocks, vocab_rows=vocab, batch_size=config.eval.batch_size
    )
    timing = step_timing(
        student, {"online": live, "cache_k64": cache}, used[:batch], args.timing_reps, vocab
    )
    median = {name: statistics.median(values) for name, values in timing.items()}
    pairs = paired_ratio(timing["online"], timing["cache_k64"])

    kl = {name: quality[name]["kl_to_teacher"] for name in students}
    speedup = pairs["median"]
    kl_ratio = kl["cache_k64_tail_bucket"] / kl["online_full_logits"]
    bytes_per_token = {k: m["bytes_per_token"] for k, m in manifests.items()}
    rows = [
        (f"cache k={k}", f"{bpt:.1f}", f"1/{full_bytes / bpt:.0f}")
        for k, bpt in sorted(bytes_per_token.items())
    ]
    rows.append(("full float16 logits", f"{full_bytes}", "1"))
    print_table(rows, ("storage", "bytes/token", "ratio to full"))
    print()
    step_rows = [(name, f"{seconds:.2f}") for name, seconds in median.items()]
    print_table(step_rows, ("KD step (4 x 256)", "seconds (median, alternated)"))
    print(
        f"online / cache per pair: {', '.join(f'{r:.2f}' for r in pairs['per_round'])} "
        f"(median {speedup:.2f}, {pairs['spread'][0]:.2f} to {pairs['spread'][1]:.2f})"
    )
    print()
    print_table(
        [(name, f"{kl[name]:.4f}", f"{quality[name]['perplexity']:.2f}") for name in students],
        (f"student after {args.steps} steps", "held-out KL(teacher||student)", "perplexity"),
    )
    kept = {t: kept_mass(cache, used[:batch], t) for t in (1.0, 2.0)}
    print(
        f"\ncache k=64: teacher mass on the top-64: {kept[1.0]:.3f} at T=1, {kept[2.0]:.3f} at T=2"
    )
    print(f"writing the k=64 cache: {tokens / manifests[64]['write_seconds']:.0f} tokens/s")

    path = write_results(
        "cache",
        {
            "setup": {
                "teacher": "SmolLM2-135M-Instruct (30 layers)",
                "student_layers": 15,
                "steps": args.steps,
                "batch": batch,
                "block": config.data.block_size,
                "loss": LossConfig().model_dump(),
                "heldout_blocks": int(heldout_blocks.shape[0]),
                "cached_blocks": int(used.shape[0]),
                "cache_dtype": "float16",
            },
            "bytes_per_token": {f"k{k}": v for k, v in bytes_per_token.items()},
            "full_float16_bytes_per_token": full_bytes,
            "cache_write_tokens_per_s_k64": tokens / manifests[64]["write_seconds"],
            "kept_mass_k64": {"T1": kept[1.0], "T2": kept[2.0]},
            "step_seconds_alternated": timing,
            "step_seconds_median": median,
            "step_speedup_per_pair": pairs["per_round"],
            "step_speedup_spread": pairs["spread"],
            "training_step_seconds": {
                name: [r["tokens"] / r["tokens_per_s"] for r in history]
                for name, history in histories.items()
            },
            "heldout": quality,
            "targets": [
                target("cache_bytes_ratio_k64", bytes_per_token[64] / full_bytes, 1 / 300, "lower"),
                target("cache_step_speedup", speedup, 1.3, "higher"),
                target("cache_kl_ratio_k64", kl_ratio, 1.05, "lower"),
            ],
        },
    )
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
