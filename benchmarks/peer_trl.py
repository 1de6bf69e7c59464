"""distill's training step against TRL's GKD trainer, side by side in one process.

Same teacher (the embedded SmolLM2-135M), same student (its first 8 + last 7 layers, one copy
each, equal at the start), same token batch, same precision (float32 on CPU; on CUDA bf16
autocast over float32 weights for both), same objective: TRL's GKD with lambda 0 (no student
generation) and beta 0 is the forward KL(teacher || student) averaged over the predicted tokens,
which is distill's loss with ``loss.alpha=0``, ``loss.temperature=1`` (the first step's two
losses are recorded to show they agree). Each side does a whole optimizer step: forwards, loss,
backward, gradient clipping at 1.0, AdamW. distill's step is the training loop's micro-batch
function (``micro_batch_terms``, the fused loss); TRL's is ``GKDTrainer.training_step`` followed
by the clip / optimizer / scheduler calls of its Trainer's loop (without the Trainer's logging
and callbacks, which only favours TRL). Steps are interleaved (distill, TRL, distill, ...) after
one warm-up step each, so a change of load hits both; medians and spreads are reported.

    python benchmarks/peer_trl.py [--steps 5] [--batch 4] [--block 128] [--device cpu|cuda]

Needs TRL (``pip install -e '.[bench]'``); without it the script stops with one line.
Writes ``results/peer_trl.json`` (CPU) or ``results/peer_trl_cuda.json`` (GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import tempfile
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import print_table, target, timed, write_results  # noqa: E402

from distill.config import LossConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402
from distill.train import build_optimizer  # noqa: E402
from distill.train.causal_lm import micro_batch_terms  # noqa: E402
from distill.train.distributed import resolve_device  # noqa: E402


def import_trl():
    """TRL's GKD trainer, or exit with one line saying why it cannot run here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import trl
            from trl.experimental.gkd import GKDConfig, GKDTrainer
    except Exception as error:  # ImportError, or TRL failing against this transformers
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        sys.exit(
            f"peer_trl.py: TRL's GKD trainer cannot run here ({reason}); "
            "install it with pip install -e '.[bench]'"
        )
    return trl, GKDConfig, GKDTrainer


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, interleaved")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument(
        "--device", default="cpu", help="cpu (float32) or cuda / cuda:N (bf16 autocast)"
    )
    parser.add_argument(
        "--trl-optim",
        default="",
        help="TRL's optimizer (a transformers `optim` name); empty = its default "
        "(fused AdamW); adamw_torch = the same torch AdamW that distill uses",
    )
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps: at least 5 timed steps of each")
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    trl, GKDConfig, GKDTrainer = import_trl()
    logging.getLogger("trl").setLevel(logging.ERROR)

    teacher_model = load_causal_lm(default_teacher_path()).to(device).eval()
    tokenizer = load_tokenizer(default_teacher_path())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = build_student(teacher_model, select_layers(30, StudentConfig())).to(device)
    trl_student = copy.deepcopy(student).train()
    student.train()
    vocab = teacher_model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(
        0, vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(0)
    ).to(device)
    tokens = args.batch * args.block

    def bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    # distill: the training loop's micro-batch, then its optimizer step
    teacher = LiveTeacher(teacher_model)
    loss_config = LossConfig(alpha=0.0, temperature=1.0)
    train_config = TrainConfig(warmup_steps=0, lr=2e-4, grad_clip=1.0)
    optimizer, scheduler = build_optimizer(student, train_config)

    def distill_step() -> float:
        with bf16():
            terms = micro_batch_terms(student, teacher, input_ids, loss_config, vocab, upcast=gpu)
        loss = terms.loss_sum / terms.n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), train_config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # TRL: GKDTrainer.training_step, then its Trainer loop's clip / optimizer / scheduler
    with tempfile.TemporaryDirectory() as output_dir:
        config = GKDConfig(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            learning_rate=train_config.lr,
            weight_decay=train_config.weight_decay,
            adam_beta1=train_config.betas[0],
            adam_beta2=train_config.betas[1],
            max_grad_norm=train_config.grad_clip,
            lr_scheduler_type="constant",
            lmbda=0.0,
            beta=0.0,
            max_length=args.block,
            bf16=gpu,
            use_cpu=not gpu,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            **({"optim": args.trl_optim} if args.trl_optim else {}),
        )
        from datasets import Dataset

        trainer = GKDTrainer(
            model=trl_student,
            teacher_model=copy.deepcopy(teacher_model),
            args=config,
            data_collator=lambda rows: rows,
            train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
            processing_class=tokenizer,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer's own loop sets first
        model = trainer.model
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
        }

        def trl_step() -> float:
            with bf16():
                loss = trainer.training_step(model, dict(batch))
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad(set_to_none=True)
            return float(loss)

        first_distill, warmup_distill = timed(distill_step, device)  # warm-up, same weights
        first_trl, warmup_trl = timed(trl_step, device)
        seconds: dict[str, list[float]] = {"distill": [], "trl": []}
        for _ in range(args.steps):
            seconds["distill"].append(timed(distill_step, device)[1])
            seconds["trl"].append(timed(trl_step, device)[1])

    stats = {name: spread(values) for name, values in seconds.items()}
    speedup = stats["trl"]["median"] / stats["distill"]["median"]
    rows = [
        (
            name,
            f"{s['median']:.3f}",
            f"{s['min']:.3f}..{s['max']:.3f}",
            f"{tokens / s['median']:.0f}",
        )
        for name, s in stats.items()
    ]
    print_table(rows, ("step", "median s", "range s", "tokens/s"))
    print(
        f"first-step loss: distill {first_distill:.5f}, TRL {first_trl:.5f}; "
        f"distill / TRL tokens/s = {speedup:.2f}"
    )
    name = "gpu_step_vs_trl_speedup" if gpu else "step_vs_trl_speedup"
    goal = 2.0 if gpu else 1.5
    path = write_results(
        "peer_trl_cuda" if gpu else "peer_trl",
        {
            "setup": {
                "teacher": "SmolLM2-135M (30 layers)",
                "student_layers": student.config.num_hidden_layers,
                "batch": args.batch,
                "block": args.block,
                "tokens_per_step": tokens,
                "timed_steps": args.steps,
                "order": "interleaved after one warm-up step each",
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if gpu else None,
                "dtype": "bf16 autocast, float32 weights" if gpu else "float32",
                "objective": "forward KL(teacher || student), mean over predicted tokens: "
                "TRL GKD lmbda=0 beta=0; distill loss.alpha=0 loss.temperature=1",
                "optimizer": "AdamW lr 2e-4, betas (0.9, 0.95), weight decay 0.01, clip 1.0",
                "distill_optimizer": "torch.optim.AdamW, torch's default implementation",
                "trl_optim": str(getattr(config.optim, "value", config.optim)),
            },
            "first_step_loss": {"distill": first_distill, "trl": first_trl},
            "warmup_seconds": {"distill": warmup_distill, "trl": warmup_trl},
            "step_seconds": seconds,
            "step_seconds_stats": stats,
            "tokens_per_s": {name: tokens / s["median"] for name, s in stats.items()},
            "targets": [target(name, speedup, goal, "higher")],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
