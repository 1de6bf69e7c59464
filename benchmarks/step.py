"""One KD training step of the default setup (the training loop's fused path), timed by phase, against the matmul roofline.

Teacher: the embedded SmolLM2-135M (30 layers); student: its first 8 + last 7 layers; batch
8 x 256 tokens; float32 on CPU. ``--device cuda`` runs the same step on a GPU the way the training
loop runs it with ``parallel.mixed_precision=bf16`` (bf16 autocast over float32 weights, head and
loss in float32) and writes ``results/step_cuda.json`` against the best bf16 matmul rate instead.
FLOPs per token: 2 x (teacher matmul params) for the teacher
forward, 6 x (student matmul params) for the student forward + backward, plus attention
(4 x T x d per layer forward, counted in full). ``step_roofline_fraction`` = achieved FLOP/s /
best float32 square-matmul FLOP/s measured in the same run.

    python benchmarks/step.py [--steps 5] [--batch 8] [--block 256] [--device cpu|cuda|cuda:N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from dataclasses import replace

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    matmul_flops_per_s,
    print_table,
    target,
    timed,
    write_results,
)

from distill.config import LossConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.losses.objective import head_distillation_loss  # noqa: E402
from distill.losses.schedule import loss_settings  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402
from distill.train import build_optimizer  # noqa: E402
from distill.train.causal_lm import (
    labels_for,  # noqa: E402
    output_head,  # noqa: E402
)
from distill.train.distributed import resolve_device  # noqa: E402


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products per token: every Linear (incl. the head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(config, block: int) -> float:
    """QK^T and AV for one token against ``block`` keys, every layer, forward only."""
    return 4 * block * config.num_attention_heads * config.head_dim * config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument(
        "--device", default="cpu", help="cpu (float32) or cuda / cuda:N (bf16 autocast)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"

    teacher_model = load_causal_lm(default_teacher_path()).to(device)
    student = build_student(teacher_model, select_layers(30, StudentConfig())).train().to(device)
    teacher = LiveTeacher(teacher_model)
    vocab = teacher.vocab_rows
    loss_config = LossConfig()
    optimizer, scheduler = build_optimizer(student, TrainConfig(warmup_steps=0))
    input_ids = torch.randint(
        0, vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(0)
    ).to(device)
    labels = labels_for(input_ids).reshape(-1)

    def bf16():  # the loop's data-parallel mixed precision: the forwards under bf16 autocast
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    def forward_teacher():
        with bf16():
            return teacher.logits(input_ids).reshape(-1, vocab).float()

    def forward_student():
        with bf16():
            return student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    def one_step(fused: bool) -> dict[str, float]:
        teacher_logits, t_teacher = timed(forward_teacher, device)
        hidden, t_student = timed(forward_student, device)
        weight, bias = output_head(student, vocab)
        terms, t_loss = timed(  # head and loss in float32 (the loop's upcast)
            lambda: head_distillation_loss(
                hidden.reshape(-1, hidden.shape[-1]).float(),  # (B*T, H)
                weight.float(),
                None if bias is None else bias.float(),
                teacher_logits,
                labels,
                replace(loss_settings(loss_config), fused=fused),
            ),
            device,
        )
        _, t_backward = timed(lambda: (terms.loss_sum / terms.n_tokens).backward(), device)

        def update() -> None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        _, t_optimizer = timed(update, device)
        return {
            "teacher_forward": t_teacher,
            "student_forward": t_student,
            "loss": t_loss,
            "backward": t_backward,
            "optimizer": t_optimizer,
        }

    compute_dtype = torch.bfloat16 if gpu else torch.float32
    size = 8192 if gpu else 2048

    def peak() -> float:
        return matmul_flops_per_s(size, device=device, dtype=compute_dtype)

    peak_flops = peak()
    one_step(fused=True)  # warm-up: allocations, optimizer state
    unfused_phases = [one_step(fused=False) for _ in range(args.steps)]
    phases = [one_step(fused=True) for _ in range(args.steps)]
    peak_flops = max(peak_flops, peak())
    median = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
    step_seconds = sum(median.values())
    unfused_seconds = statistics.median(sum(p.values()) for p in unfused_phases)
    tokens = args.batch * args.block
    flops_per_token = (
        2 * matmul_params(teacher_model)
        + attention_flops_per_token(teacher_model.config, args.block)
        + 6 * matmul_params(student)
        + 3 * attention_flops_per_token(student.config, args.block)
    )
    achieved = flops_per_token * tokens / step_seconds
    fraction = achieved / peak_flops

    rows = [
        (name, f"{seconds:.2f}", f"{100 * seconds / step_seconds:.0f}%")
        for name, seconds in median.items()
    ]
    rows.append(("total", f"{step_seconds:.2f}", "100%"))
    print_table(rows, ("phase", "seconds (median)", "share"))
    print(f"unfused loss path: {unfused_seconds:.2f} s/step (fused: {step_seconds:.2f})")
    print(
        f"tokens/s {tokens / step_seconds:.0f}; achieved {achieved / 1e9:.1f} GFLOP/s; "
        f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s; roofline fraction {fraction:.2f}"
    )
    dtype = "bf16 autocast, float32 weights" if gpu else "float32"
    tokens_per_s = tokens / step_seconds
    targets = [target("step_roofline_fraction", fraction, 0.6, "higher")]
    if gpu:
        targets = [
            target("gpu_step_roofline_fraction", fraction, 0.6, "higher"),
            {"name": "gpu_tokens_per_s", "value": tokens_per_s, "target": None, "better": "higher"},
        ]
    path = write_results(
        "step_cuda" if gpu else "step",
        {
            "setup": {
                "batch": args.batch,
                "block": args.block,
                "teacher_layers": 30,
                "student_layers": 15,
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if gpu else None,
                "dtype": dtype,
                "timed_steps": args.steps,
            },
            "phase_seconds_median": median,
            "phase_seconds_all": phases,
            "unfused_phase_seconds_all": unfused_phases,
            "unfused_step_seconds": unfused_seconds,
            "step_seconds": step_seconds,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token,
            "achieved_flops_per_s": achieved,
            "matmul_flops_per_s": peak_flops,
            "matmul_dtype": str(compute_dtype).removeprefix("torch."),
            "targets": targets,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
