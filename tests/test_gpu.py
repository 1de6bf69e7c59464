"""The CUDA path on tiny models: bf16 autocast against float32, the fused loss on the GPU against
the CPU reference, checkpoint / resume across devices, generation with the KV cache, FSDP on one
NCCL rank. ``make test-gpu`` (``pytest -m gpu``) runs them; without CUDA each is skipped.

Tolerances, and why:
- bf16 autocast vs float32, one AdamW step: loss within 2% (bf16 keeps 8 bits of mantissa, the
  loss itself is computed in float32 from bf16 activations), gradient norm within 5%; AdamW's
  first update is ``lr * sign(grad)`` (up to eps), so the weights are within ``2 * lr`` of each
  other and at least 90% of the update directions agree.
- fused loss on CUDA vs the unfused float32 loss on CPU: relative error 1e-4 (float32 with a
  different summation order; TF32 matmuls are switched off in these tests).
- resume on the GPU vs straight on the GPU: 1e-5 (atomics in the embedding backward are not
  bitwise deterministic); resume on the CPU from a GPU checkpoint: losses within 1e-3 and weights
  within ``2 * lr`` per resumed step (AdamW's update is bounded by lr per step).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.distributed as dist
from conftest import make_llama
from test_fused import MASKED, NAMES, grads_of, head_case, relative_error, unfused

from distill.config import LossConfig, ParallelConfig, TrainConfig
from distill.data import BlockBatches
from distill.losses import fused_distillation_loss
from distill.sampling import Sampling, sample_continuations
from distill.teacher import LiveTeacher
from distill.train import train
from distill.train.loop import CheckpointPlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 64
LR = 1e-3
GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matmuls, so a GPU float32 result is comparable with the CPU's."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _blocks() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))


def _models(device: torch.device):
    teacher = make_llama(VOCAB, layers=3, seed=1).to(device)
    student = make_llama(VOCAB, layers=2, seed=2).to(device)
    return teacher, student


def _train(student, teacher, steps: int, **kwargs):
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=0, lr=LR)
    batches = BlockBatches(_blocks(), 4, 0)
    loss = LossConfig(alpha=0.5)
    return train(student, LiveTeacher(teacher), batches, loss, config, vocab_rows=VOCAB, **kwargs)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu() for name, p in model.named_parameters()}


def test_bf16_autocast_step_matches_float32():
    teacher, student = _models(GPU)
    before = _params(student)
    results = {}
    for setting in ("no", "bf16"):
        trained = copy.deepcopy(student).train()
        state = _train(
            trained, copy.deepcopy(teacher), 1, parallel=ParallelConfig(mixed_precision=setting)
        )
        results[setting] = (state.history[0], _params(trained))
    (full, full_weights), (half, half_weights) = results["no"], results["bf16"]
    assert half["loss"] == pytest.approx(full["loss"], rel=2e-2)
    assert half["grad_norm"] == pytest.approx(full["grad_norm"], rel=5e-2)
    agree, total = 0, 0
    for name, weight in full_weights.items():
        assert (half_weights[name] - weight).abs().max() <= 2 * LR + 1e-6, name
        full_step = torch.sign(weight - before[name])
        half_step = torch.sign(half_weights[name] - before[name])
        agree += int((full_step == half_step).sum())
        total += weight.numel()
    assert agree / total >= 0.9


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("chunk_size", [7, 0])
def test_fused_loss_on_cuda_equals_cpu_reference(divergence, chunk_size):
    hidden, weight, bias, teacher, labels = head_case(0, 37, 24, 300, masked=MASKED, bias=True)
    options = {"temperature": 2.0, "alpha": 0.3, "beta": 0.3, "skew": 0.2}
    options["divergence"] = divergence
    reference, reference_grads = grads_of(
        lambda h, w, b: unfused(h, w, b, teacher, labels, **options), hidden, weight, bias
    )
    gpu_teacher, gpu_labels = teacher.to(GPU), labels.to(GPU)
    fused, fused_grads = grads_of(
        lambda h, w, b: fused_distillation_loss(
            h, w, gpu_teacher, gpu_labels, bias=b, chunk_size=chunk_size, **options
        ),
        hidden.to(GPU),
        weight.to(GPU),
        bias.to(GPU),
    )
    assert int(fused.n_tokens) == int(reference.n_tokens)
    for name in ("loss_sum", "ce_sum", "divergence_sum"):
        got = getattr(fused, name).cpu()
        assert relative_error(got, getattr(reference, name)) <= 1e-4, name
    for name, got, want in zip(
        ("hidden", "weight", "bias"), fused_grads, reference_grads, strict=True
    ):
        assert got.is_cuda
        assert relative_error(got.cpu(), want) <= 1e-4, name


def test_checkpoint_on_gpu_resumes_on_gpu_and_on_cpu(tmp_path):
    teacher, student = _models(GPU)
    initial_student, initial_teacher = copy.deepcopy(student).cpu(), copy.deepcopy(teacher).cpu()
    straight = copy.deepcopy(student).train()
    saved = tmp_path / "straight"
    reference = _train(straight, teacher, 4, checkpoints=CheckpointPlan(saved, every=2, keep=3))
    assert sorted(p.name for p in saved.iterdir()) == ["step-00000002", "step-00000004"]
    shutil.rmtree(saved / "step-00000004")  # as if the run had stopped after step 2
    straight_weights = _params(straight)
    straight_losses = [record["loss"] for record in reference.history]

    for where, device, rtol, atol in (("gpu", GPU, 1e-5, 1e-5), ("cpu", CPU, 1e-3, 2 * 2 * LR)):
        directory = tmp_path / f"resumed-on-{where}"
        shutil.copytree(saved, directory)
        resumed = copy.deepcopy(initial_student).to(device).train()
        state = _train(
            resumed,
            copy.deepcopy(initial_teacher).to(device),
            4,
            checkpoints=CheckpointPlan(directory, every=2, keep=3, resume=True),
        )
        assert [record["step"] for record in state.history] == [1, 2, 3, 4], device
        assert next(resumed.parameters()).device.type == device.type
        losses = [record["loss"] for record in state.history]
        assert losses[:2] == straight_losses[:2]  # restored from the checkpoint, not retrained
        assert losses[2:] == pytest.approx(straight_losses[2:], rel=rtol)
        for name, weight in _params(resumed).items():
            torch.testing.assert_close(weight, straight_weights[name], rtol=rtol, atol=atol)


def test_generation_with_kv_cache_on_cuda():
    model = make_llama(VOCAB, layers=2, seed=3).to(GPU)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    greedy = Sampling(max_new_tokens=8, temperature=0.0)
    cached = sample_continuations(model, prompts, greedy, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for prompt, continuation in zip(prompts, cached, strict=True):
            ids = torch.tensor([prompt], device=GPU)
            for _ in range(greedy.max_new_tokens):  # no cache: the whole prefix every token
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            assert continuation == ids[0, len(prompt) :].tolist()
    hot = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(5)
    first = sample_continuations(model, prompts, hot, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(5)
    again = sample_continuations(model, prompts, hot, eos_token_id=None, pad_token_id=0)
    assert first == again
    assert all(len(ids) == 8 and all(0 <= i < VOCAB for i in ids) for ids in first)


@pytest.fixture
def nccl_group():
    """A one-rank NCCL group in this process, so FSDP shards over one GPU."""
    torch.cuda.set_device(GPU)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_on_one_nccl_rank_equals_unsharded(nccl_group):
    teacher, student = _models(GPU)
    plain, sharded = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    plain_state = _train(plain, copy.deepcopy(teacher), 3)
    sharded_state = _train(
        sharded, copy.deepcopy(teacher), 3, parallel=ParallelConfig(strategy="fsdp")
    )
    assert next(sharded.parameters()).is_cuda
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(plain_state.history, sharded_state.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
