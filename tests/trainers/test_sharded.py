"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (torchrun, gloo): SFT equals one process; Core-Cocktail under
DeepSpeed completes in one command and resumes after SIGKILL in each stage; engines that cannot run fail at start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fun_audio_chat.trainers import FunAudioChatTrainer

from .helpers import base_llm_checkpoint, collate, equivalence_dataset, oracle_model, training_args

WORKER = Path(__file__).with_name("sharded_worker.py")
REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
]


def _command(*args) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", "2", str(WORKER), *map(str, args)]


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(REPO),
        "TRANSFORMERS_VERBOSITY": "error",
    }


def _run(tmp_path, *args, timeout=300):
    proc = subprocess.run(_command(*args), env=_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def single_process_step(tmp_path_factory):
    """One SGD step on the whole 4-example batch in one process (the reference of every engine)."""
    model = oracle_model()
    args = training_args(
        tmp_path_factory.mktemp("single"),
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=4,
    )
    FunAudioChatTrainer(model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_sft_equals_one_process(engine, tmp_path, single_process_step):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    _run(tmp_path, "sft", engine, tmp_path)
    report = json.loads((tmp_path / f"{engine}.json").read_text())
    assert report["world_size"] == 2 and report["tied"]
    if engine == "fsdp2":
        assert report["wrapper"].startswith("FSDP") and report["sharded"]
    else:
        assert report["wrapper"] == "DeepSpeedEngine"
    trained = load_file(str(tmp_path / f"{engine}.safetensors"))
    start = oracle_model().state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-3  # it did train
    for name, value in trained.items():
        torch.testing.assert_close(value, single_process_step[name].float(), atol=5e-6, rtol=1e-5, msg=name)
