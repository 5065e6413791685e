"""The same SFT and Core-Cocktail code under 2-process data parallelism (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fun_audio_chat.trainers import FunAudioChatTrainer

from ..markers import torchrun, two_processes
from .helpers import base_llm_checkpoint, collate, equivalence_dataset, oracle_model, training_args

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@two_processes
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_sft_and_core_cocktail(tmp_path):
    base = base_llm_checkpoint(oracle_model(), tmp_path / "base")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(REPO),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    cmd = [*torchrun(), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "out"), str(base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    out = tmp_path / "out"
    logs = json.loads((out / "logs_rank0.json").read_text())
    assert logs["world_size"] == 2
    initial = {k: v for k, v in oracle_model().state_dict().items()}
    for run in ("sft", "equiv", "cc"):
        rank0 = load_file(str(out / f"{run}_rank0.safetensors"))
        rank1 = load_file(str(out / f"{run}_rank1.safetensors"))
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{run}: {name} differs between ranks"
        changed = [n for n in rank0 if not torch.equal(rank0[n], initial[n])]
        assert any(n.startswith("language_model.") for n in changed) and any(
            n.startswith("audio_invert_tower.") for n in changed
        )
    # data parallel + accumulation == one big batch in one process (per-stream normalisation across processes)
    model = oracle_model()
    args = training_args(
        tmp_path / "single",
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=4,
    )
    FunAudioChatTrainer(model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate).train()
    ddp = load_file(str(out / "equiv_rank0.safetensors"))
    for name, value in ddp.items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=2e-6, rtol=1e-5, msg=name)

    steps = [h for h in logs["sft"] if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert h["loss"] == pytest.approx(h["text_loss"] + h["speech_loss"], rel=1e-4)
    assert json.loads((out / "cc" / "core_cocktail_state.json").read_text())["status"] == "done"
    assert (out / "cc" / "merged" / "merge_manifest.json").is_file()
    assert not any(p.name.startswith(".merged") for p in (out / "cc").iterdir())
    shutil.rmtree(out, ignore_errors=True)
