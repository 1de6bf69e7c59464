"""``train.device``: the schema's accepted forms, the one function that resolves it, the
one-line refusal of a GPU that is not there (exit 2, before any model loads), and a rank's
process group torn down at exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port
from test_cli import assert_one_line_error, run_cli

from distill.config import TrainConfig, load_config
from distill.errors import ConfigError
from distill.train.distributed import init_distributed, resolve_device


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_schema_accepts_the_device_forms(value):
    assert load_config(overrides=[f"train.device={value}"]).train.device == value


@pytest.mark.parametrize("value", ["cuda:x", "gpu", "CUDA", "cuda:-1", "cpu:0", "mps"])
def test_schema_refuses_other_devices_in_one_line(value):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[f"train.device={value}"])
    message = str(error.value)
    assert "train.device" in message and "auto, cpu, cuda or cuda:N" in message
    assert "\n" not in message


def test_encoder_tasks_refuse_a_gpu():
    with pytest.raises(ConfigError, match="trains on CPU only"):
        load_config(overrides=["task=embedding", "train.device=cuda"])


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert resolve_device(TrainConfig()) == torch.device("cpu")  # the default is auto
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"train.device={name}: .*use train.device=cpu"):
            resolve_device(name)


def test_resolve_with_gpus(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(TrainConfig(device="cuda:1")) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # a GPU box can still train on CPU
    with pytest.raises(ConfigError, match="GPU 2 does not exist"):
        resolve_device("cuda:2")


def test_torchrun_refuses_one_named_gpu_for_all_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="names one GPU for all 2 ranks"):
        init_distributed("auto", TrainConfig(device="cuda:0"))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cli_refuses_cuda_without_a_gpu_before_loading(tmp_path):
    result = run_cli(
        "run",
        "--set",
        "train.device=cuda",
        "--set",
        f"teacher.path={tmp_path / 'not_loaded'}",  # never read: the device is refused first
        "--set",
        f"output_dir={tmp_path}",
    )
    assert_one_line_error(result, "train.device=cuda", "train.device=cpu")


def test_a_rank_leaves_its_process_group_before_exit(tmp_path):
    """Each rank destroys the group it joined before the interpreter tears down (gloo threads
    left to interpreter teardown can abort a finished run): an exit hook registered before
    joining runs after distill's and sees no group."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, os, pathlib\n"
        "import torch.distributed as dist\n"
        "from distill.train.distributed import init_distributed\n"
        "seen = pathlib.Path(__file__).with_name('rank' + os.environ['RANK'])\n"
        "atexit.register(lambda: seen.write_text(str(dist.is_initialized())))\n"
        "init_distributed('gloo', 'cpu')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["False", "False"]
