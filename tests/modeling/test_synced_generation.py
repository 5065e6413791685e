"""``synced_gpus=True`` in two real processes (torchrun, gloo on CPU), the model sharded by FSDP2 or DeepSpeed ZeRO-3."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ..markers import torchrun, two_processes

WORKER = Path(__file__).with_name("synced_generation_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@two_processes
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_rank_whose_reply_ended_keeps_running_the_sharded_speech_head(tmp_path, engine):
    """Rank 0's reply ends after 3 steps, rank 1's runs 8: rank 0 keeps running the LLM step and the SRH group (its
    output dropped), so rank 1's gathers of the sharded SRH layers find their peer. Each rank's reply equals its
    solo run. (When the finished rank skipped the SRH, the running rank waited in a gather until the timeout.)"""
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is part of the test extra; install fun-audio-chat[test]")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path), engine]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert results[0]["new_tokens"] < results[1]["new_tokens"], "rank 0 must finish first"
    for result in results:
        assert torch.equal(result["synced_sequences"], result["solo_sequences"])
        assert torch.equal(result["synced_speech"], result["solo_speech"])
        assert result["solo_speech"].shape[1] > 0
