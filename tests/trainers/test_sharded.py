"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (torchrun, gloo): SFT, LoRA and DPO equal one process;
Core-Cocktail resumes after SIGKILL in each stage under ZeRO-2, ZeRO-3 and FSDP2, the same command each time, with the
single-process result; settings that cannot work fail at start.

Each launch starts two processes that import the whole stack (about 10 s of CPU each), so one launch runs every engine
where the engines can share a process.
"""

from __future__ import annotations

import importlib.util
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

from ..markers import two_processes
from .helpers import base_llm_checkpoint, collate, equivalence_dataset, oracle_model, train_dataset, training_args

WORKER = Path(__file__).with_name("sharded_worker.py")
DPO_WORKER = Path(__file__).with_name("dpo_sharded_worker.py")
REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    two_processes,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
]


def _command(*args, worker: Path = WORKER) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", "2", str(worker), *map(str, args)]


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(REPO),
        "TRANSFORMERS_VERBOSITY": "error",
    }


def _run(tmp_path, *args, timeout=300, worker: Path = WORKER):
    command = _command(*args, worker=worker)
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """``TrainingArguments(deepspeed=...)`` built in this process leaves transformers' DeepSpeed config and accelerate's
    shared state in DeepSpeed mode, and every later Trainer of the process would then start DeepSpeed: reset both."""
    yield
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


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


def _has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _engines() -> str:
    """The engines one launch runs, DeepSpeed first (the worker's docstring says why)."""
    return "zero2,zero3,fsdp2" if _has_deepspeed() else "fsdp2"


def _skip_without(engine: str) -> None:
    if engine.startswith("zero") and not _has_deepspeed():
        pytest.skip("deepspeed is not installed")


@pytest.fixture(scope="module")
def sharded_steps(tmp_path_factory):
    """``sharded_steps(engine)``: the directory where the worker left each engine's SFT step weights and LoRA step
    adapter. One launch runs every engine: each launch starts two processes that import the whole stack."""
    out = tmp_path_factory.mktemp("steps")
    _run(out, "sft,lora", _engines(), out)

    def run(engine: str) -> Path:
        _skip_without(engine)
        return out

    return run


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_sft_equals_one_process(engine, sharded_steps, single_process_step):
    tmp_path = sharded_steps(engine)
    report = json.loads((tmp_path / f"sft-{engine}.json").read_text())
    assert report["world_size"] == 2 and report["tied"]
    if engine == "fsdp2":
        assert report["wrapper"].startswith("FSDP") and report["sharded"]
    else:
        assert report["wrapper"] == "DeepSpeedEngine"
    trained = load_file(str(tmp_path / f"sft-{engine}.safetensors"))
    start = oracle_model().state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-3  # it did train
    for name, value in trained.items():
        torch.testing.assert_close(value, single_process_step[name].float(), atol=5e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def single_process_lora_step(tmp_path_factory):
    """The adapter after one single-process SGD step on the whole batch, saved by ``Trainer.save_model``."""
    from .sharded_worker import lora_model

    out = tmp_path_factory.mktemp("single_lora")
    args = training_args(
        out,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=4,
    )
    model = lora_model()
    trainer = FunAudioChatTrainer(model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_lora_equals_one_process(engine, sharded_steps, single_process_lora_step):
    """A LoRA adapter (LLM + SRH, with the SRH's modules_to_save) trains under each engine, ``save_model`` writes the
    adapter, and it equals the single-process one; FSDP2 still shards layer by layer."""
    tmp_path = sharded_steps(engine)
    report = json.loads((tmp_path / f"lora-{engine}.json").read_text())
    assert report["world_size"] == 2 and report["tied"]
    if engine == "fsdp2":
        assert report["sharded"] and report["layer_units"] == 6  # 2 LLM, 2 SRH, 2 audio-encoder layers
    else:
        assert report["wrapper"] == "DeepSpeedEngine"
    adapter = load_file(str(tmp_path / f"lora-{engine}" / "adapter_model.safetensors"))
    assert set(adapter) == set(single_process_lora_step)
    assert any("modules_to_save" in key or "pre_matching" in key for key in adapter)
    for name, value in adapter.items():
        torch.testing.assert_close(value, single_process_lora_step[name], atol=5e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ Core-Cocktail
@pytest.fixture(scope="module")
def core_cocktail_base(tmp_path_factory):
    return base_llm_checkpoint(oracle_model(), tmp_path_factory.mktemp("cc_base") / "base")


@pytest.fixture(scope="module")
def single_process_core_cocktail(tmp_path_factory, core_cocktail_base):
    """The final weights of the same two stages in one process (batch 2 = the 2 processes' batch 1 each)."""
    from fun_audio_chat.trainers import run_core_cocktail

    from .sharded_worker import core_cocktail_stages

    stage1, stage2 = core_cocktail_stages(per_device_train_batch_size=2)
    out = tmp_path_factory.mktemp("cc_single") / "run"
    result = run_core_cocktail(
        oracle_model(),
        core_cocktail_base,
        train_dataset(2),
        out,
        data_collator=collate,
        stage1_args=stage1,
        stage2_args=stage2,
    )
    return {k: v.detach().float().clone() for k, v in result.model.state_dict().items()}


def _assert_equals_one_process(run: Path, single_process_core_cocktail, atol=1e-6):
    final = load_file(str(run / "result.safetensors"))
    start = oracle_model().state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-3  # it did train
    for name, value in final.items():
        torch.testing.assert_close(value, single_process_core_cocktail[name], atol=atol, rtol=1e-5, msg=name)


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it, and wait until all are gone. torchrun starts each worker in a new
    session, so killing torchrun's process group would leave the workers running (writing into the run directory
    while the next launch resumes it)."""
    import psutil

    try:
        launcher = psutil.Process(proc.pid)
        victims = [*launcher.children(recursive=True), launcher]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(victims, timeout=30)
    assert not alive, f"processes of the killed launch still run: {alive}"


def _launch_and_kill_when(tmp_path, args, checkpoint: Path, timeout=300):
    """Start the worker, SIGKILL it (torchrun and both workers) once both processes have finished saving
    ``checkpoint`` (a stage's ``checkpoint-1``) and pause there, so the kill lands before the stage goes on."""
    markers = [checkpoint / f"paused-rank{rank}" for rank in range(2)]
    proc = subprocess.Popen(
        _command(*args),
        env={**_env(), "PAUSE_AFTER_SAVE": "30"},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    try:
        while not all(marker.exists() for marker in markers):
            assert proc.poll() is None, f"the run ended before both processes paused at {checkpoint}"
            assert time.monotonic() < deadline, f"both processes did not pause at {checkpoint} in {timeout} s"
            time.sleep(0.2)
    finally:
        _kill_launch(proc)


def test_core_cocktail_under_deepspeed_resumes_after_sigkill_in_each_stage(
    tmp_path, core_cocktail_base, single_process_core_cocktail
):
    """ZeRO-2, SIGKILLed in stage 1 and again in stage 2: the same command each time, and the third one finishes with
    the single-process result. The second launch goes from a resumed stage 1 through the merge into stage 2 in one
    command (the DDP test runs the whole uninterrupted command)."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    args = ("cc", "zero2", tmp_path, core_cocktail_base, run)
    _launch_and_kill_when(tmp_path, args, run / "stage1" / "checkpoint-1")
    assert not (run / "merged").exists()
    _launch_and_kill_when(tmp_path, args, run / "stage2" / "checkpoint-1")
    assert (run / "merged" / "merge_manifest.json").is_file() and not (run / "final").exists()
    _run(tmp_path, *args)
    assert json.loads((run / "core_cocktail_state.json").read_text())["status"] == "done"
    assert (run / "final" / "config.json").is_file()
    assert json.loads((run / "merged" / "merge_manifest.json").read_text())["global_step"] == 2
    _assert_equals_one_process(run, single_process_core_cocktail)


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_core_cocktail_with_sharded_parameters(engine, tmp_path, core_cocktail_base, single_process_core_cocktail):
    """ZeRO-3 / FSDP2: stage 1 ends with save_model (full weights), process 0 merges on disk, stage 2 trains a model
    reloaded from the merge. Killed during stage 1 and again during stage 2 (which resumes the sharded checkpoint of
    the reloaded model), the same command then finishes with the single-process result."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    args = ("cc", engine, tmp_path, core_cocktail_base, run)
    _launch_and_kill_when(tmp_path, args, run / "stage1" / "checkpoint-1")
    assert not (run / "merged").exists()
    _launch_and_kill_when(tmp_path, args, run / "stage2" / "checkpoint-1")
    assert (run / "merged" / "merge_manifest.json").is_file() and not (run / "final").exists()
    _run(tmp_path, *args)
    assert json.loads((run / "core_cocktail_state.json").read_text())["status"] == "done"
    assert (run / "stage1" / "final" / "model.safetensors").is_file()
    manifest = json.loads((run / "merged" / "merge_manifest.json").read_text())
    assert manifest["tuned"] == str(run / "stage1" / "final")
    assert manifest["global_step"] == 2  # stage 1's last step, as the in-place merge records it
    _assert_equals_one_process(run, single_process_core_cocktail)


# -------------------------------------------------------------------------------------------------------- DPO
@pytest.fixture(scope="module")
def single_process_dpo(tmp_path_factory):
    """The weights after the DPO worker's two steps in one process (2 pairs per step)."""
    from .dpo_sharded_worker import train

    out = tmp_path_factory.mktemp("dpo_single")
    train("single", tiny_dpo_model(), out)
    report = json.loads((out / "dpo-single.json").read_text())
    return {"weights": load_file(str(out / "dpo-single.safetensors")), "losses": report["losses"]}


def tiny_dpo_model():
    from .dpo_helpers import tiny_model

    return tiny_model(0)


@pytest.fixture(scope="module")
def sharded_dpo(tmp_path_factory):
    """One launch of the DPO worker: ZeRO-2, ZeRO-3, then FSDP2, in the same two processes."""
    out = tmp_path_factory.mktemp("dpo_sharded")
    _run(out, _engines(), out, worker=DPO_WORKER)
    return out


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_sharded_dpo_equals_one_process(engine, sharded_dpo, single_process_dpo):
    """FunAudioChatDPOTrainer (full fine-tuning, frozen reference copy) under ZeRO-2 / ZeRO-3 / FSDP2 on 2 processes:
    the same losses and, after 2 SGD steps, the same weights as one process. Under fsdp= it really runs FSDP2 on CPU
    processes (accelerate alone would run DDP)."""
    _skip_without(engine)
    report = json.loads((sharded_dpo / f"dpo-{engine}.json").read_text())
    assert report["world_size"] == 2
    if engine == "fsdp2":
        assert report["fsdp"] and not report["deepspeed"] and report["wrapper"].startswith("FSDP")
    else:
        assert report["deepspeed"] and report["wrapper"] == "DeepSpeedEngine"
    assert report["losses"] == pytest.approx(single_process_dpo["losses"], abs=1e-5)
    trained = load_file(str(sharded_dpo / f"dpo-{engine}.safetensors"))
    assert set(trained) == set(single_process_dpo["weights"])  # full tensors, every one of them
    start = tiny_dpo_model().state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-3  # it did train
    for name, value in trained.items():
        torch.testing.assert_close(value, single_process_dpo["weights"][name], atol=5e-6, rtol=1e-5, msg=name)


def test_engines_that_cannot_run_fail_at_start(tmp_path):
    """In one process: Core-Cocktail settings under which save_model would not write the full weights the merge needs,
    and DeepSpeed with use_cpu, are refused before any training."""
    from fun_audio_chat.trainers import run_core_cocktail
    from fun_audio_chat.trainers.distributed import deepspeed_config

    model = oracle_model()
    for stage_args, message in (
        (
            {"deepspeed": deepspeed_config(3, zero_optimization={"stage3_gather_16bit_weights_on_model_save": False})},
            "stage3_gather_16bit_weights_on_model_save=true",
        ),
        (
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}},
            "FULL_STATE_DICT",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            run_core_cocktail(model, tmp_path, [], tmp_path / "cc", stage1_args={**stage_args, "use_cpu": True})
    assert not (tmp_path / "cc").exists()
    # a PEFT model: the merge needs full weights, which a LoRA run neither trains nor saves
    from .sharded_worker import lora_model

    with pytest.raises(TypeError, match="merge_and_unload"):
        run_core_cocktail(lora_model(), tmp_path, [], tmp_path / "cc", stage1_args={"use_cpu": True})
    assert not (tmp_path / "cc").exists()
    # deepspeed= with use_cpu=True: either DeepSpeed really starts, or the trainer refuses (never silently without it)
    args = training_args(tmp_path / "ds", deepspeed=deepspeed_config(2))
    try:
        trainer = FunAudioChatTrainer(
            model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate
        )
    except ValueError as error:
        assert "did not start DeepSpeed" in str(error)
    else:
        assert trainer.is_deepspeed_enabled
