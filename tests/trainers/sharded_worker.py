"""Worker of the 2-process FSDP / DeepSpeed tests (``torchrun --nproc_per_node 2 sharded_worker.py MODE ENGINE OUT``).

MODE is ``cc`` or a comma-separated list of ``sft`` and ``lora``; with those, ENGINE may be a comma-separated list too
(every mode under every engine, one after the other in the same processes: one launch instead of one per engine;
DeepSpeed engines first, since accelerate cannot turn a process state set up for another engine into a DeepSpeed one).

MODE ``sft``: one SGD step on a fixed global batch whose examples have different target counts on the two ranks;
rank 0 saves the full weights (the test compares them with one single-process step on the whole batch).
MODE ``lora``: the same step on a LoRA adapter (LLM + SRH, :func:`lora_model`); ``Trainer.save_model`` writes the
adapter to ``OUT/lora-ENGINE``.
MODE ``cc``: ``run_core_cocktail`` (2 + 2 steps, a checkpoint every step, :func:`core_cocktail_stages`) with ``BASE``
as the Core-Cocktail base and ``RUN`` as its output directory (``... cc ENGINE OUT BASE RUN``); rank 0 saves the final
weights there as ``result.safetensors``.
ENGINE: ``fsdp2`` (Trainer ``fsdp=`` with FSDP2), ``zero2`` or ``zero3`` (Trainer ``deepspeed=``).
``PAUSE_AFTER_SAVE=SECONDS`` in the environment makes the save of each stage's ``checkpoint-1`` wait that long, so a
test that kills the run once that checkpoint exists lands inside the stage whatever the machine's speed (later
checkpoints, which a resumed run writes before it reaches the next kill point, do not wait).
"""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fun_audio_chat.trainers import FunAudioChatTrainer, run_core_cocktail  # noqa: E402
from fun_audio_chat.trainers.distributed import (  # noqa: E402
    deepspeed_training_arguments,
    fsdp2_training_arguments,
    release_distributed_engine,
)
from tests.trainers.helpers import collate, equivalence_dataset, oracle_model, train_dataset, training_args  # noqa: E402


class PauseAfterSave(TrainerCallback):
    """Waits after the save of a stage's first checkpoint (the tests' kill points). Each process first writes
    ``paused-rank{N}`` into the checkpoint: rank 0 writes ``trainer_state.json`` while the other rank may still be
    writing its shards, so a kill is safe only once every rank has reached this point."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_save(self, args, state, control, **kwargs):
        import time

        if state.global_step == 1:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (checkpoint / f"paused-rank{args.process_index}").touch()
            time.sleep(self.seconds)


def skip_shared_memory_kernel() -> None:
    """DeepSpeed JIT-compiles a shared-memory CPU all-reduce kernel on first use (minutes on a busy machine);
    the tests use gloo's collectives instead."""
    import importlib

    # (``deepspeed.comm.torch`` as an attribute is the torch package re-exported by deepspeed.comm: use the module)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def engine_arguments(engine: str, model) -> dict:
    if engine == "fsdp2":
        return fsdp2_training_arguments(model)
    if engine in ("zero2", "zero3"):
        skip_shared_memory_kernel()
        return {**deepspeed_training_arguments(int(engine[-1]), zero_allow_untested_optimizer=True), "use_cpu": False}
    raise ValueError(engine)


def full_state(trainer, model) -> dict:
    """Full weights, gathered on every rank (collective under FSDP2 and ZeRO-3)."""
    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        return {k: v.detach().float().contiguous().clone() for k, v in (state or {}).items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().float().contiguous().clone()
    return state


def lora_model():
    """The oracle model with a LoRA adapter on the LLM and the SRH (random non-zero B, so both A and B get gradients;
    no dropout, so every process computes the same function)."""
    from peft import get_peft_model

    from fun_audio_chat.trainers import fun_audio_chat_lora_config

    model = oracle_model()
    torch.manual_seed(0)
    config = fun_audio_chat_lora_config("both", r=4, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, config)


def core_cocktail_stages(**overrides) -> tuple[dict, dict]:
    """The two stages' arguments of the Core-Cocktail runs: 2 steps each of SGD with momentum (so that equal gradients
    give equal weights, where Adam would blow the rounding noise of near-zero gradients up to full steps, and with an
    optimizer state that a resumed stage must restore), a checkpoint every step, sequential batches (the same examples
    per optimizer step in one process and in two)."""
    stage1 = dict(
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        optim="sgd",
        optim_args="momentum=0.9",
        train_sampling_strategy="sequential",
        learning_rate=0.1,
        min_lr=0.01,
        **overrides,
    )
    stage1.setdefault("use_cpu", True)
    return stage1, {**stage1, "learning_rate": 0.01, "min_lr": 0.001}


def one_step(mode: str, engine: str, model, out: Path, rank: int) -> None:
    """MODE ``sft`` / ``lora``: one SGD step of ``model`` on the fixed global batch; save and report as described above."""
    args = training_args(
        out / mode,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        **engine_arguments(engine, model),
    )
    trainer = FunAudioChatTrainer(model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate)
    trainer.train()
    if mode == "lora":  # the adapter as users save it (every process takes part in gathering it)
        trainer.save_model(str(out / f"lora-{engine}"))
    else:
        state = full_state(trainer, model)
        if rank == 0:
            state.pop("audio_invert_tower.lm_head.weight", None)
            save_file(state, str(out / f"sft-{engine}.safetensors"))
    base = model.get_base_model() if mode == "lora" else model
    if rank == 0:
        report = {
            "wrapper": type(trainer.model_wrapped).__name__,
            "sharded": type(next(base.language_model.parameters())).__name__ == "DTensor",
            "world_size": trainer.args.world_size,
            "tied": base.audio_invert_tower.lm_head.weight is base.audio_tower.embed_tokens.weight,
            # FSDP2 units (modules with FSDP's reshard()) that are single layers
            "layer_units": sum(".layers." in n and hasattr(m, "reshard") for n, m in model.named_modules()),
        }
        (out / f"{mode}-{engine}.json").write_text(json.dumps(report))
    release_distributed_engine(trainer)


def main():
    mode, engine, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    if mode != "cc":
        # every model is built before any engine's arguments exist (under ZeRO-3 they would make from_pretrained
        # partition the model while loading)
        runs = [(name, each) for each in engine.split(",") for name in mode.split(",")]
        models = {run: lora_model() if run[0] == "lora" else oracle_model() for run in runs}
        for (name, each), model in models.items():
            one_step(name, each, model, out, rank)
    else:
        model = oracle_model()
        base = Path(sys.argv[4])
        run_dir = Path(sys.argv[5])
        stage1, stage2 = core_cocktail_stages(per_device_train_batch_size=1, **engine_arguments(engine, model))
        result = run_core_cocktail(
            model,
            base,
            train_dataset(2),
            run_dir,
            data_collator=collate,
            stage1_args=stage1,
            stage2_args=stage2,
            callbacks=[PauseAfterSave(float(os.environ["PAUSE_AFTER_SAVE"]))]
            if "PAUSE_AFTER_SAVE" in os.environ
            else None,
        )
        if engine == "zero2":
            state = {k: v.detach().float().contiguous().clone() for k, v in result.model.state_dict().items()}
        else:  # the parameters are sharded: the whole final weights are on disk
            state = {k: v.float() for k, v in load_file(str(run_dir / "final" / "model.safetensors")).items()}
        if rank == 0:
            state.pop("audio_invert_tower.lm_head.weight", None)
            save_file(state, str(run_dir / "result.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
