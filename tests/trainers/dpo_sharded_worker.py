"""Worker of the 2-process DPO tests under sharded engines (``torchrun --nproc_per_node 2 dpo_sharded_worker.py ENGINES
OUT``, ENGINES comma-separated and run one after the other), through the public DPO trainer API only.

Full fine-tuning of the tiny model against a frozen copy of itself (``ref_model=None``), 2 SGD steps on 4 preference
pairs with 1 pair per process and step (sequential order, so the two processes together see the same pairs per step
as one process with 2 pairs). ENGINE: ``zero2``, ``zero3`` (``deepspeed_training_arguments``) or ``fsdp2``
(``fsdp2_training_arguments``); ``single`` runs the same training in one process with 2 pairs per step. Process 0
saves the trained weights to ``OUT/dpo-ENGINE.safetensors`` and a report to ``OUT/dpo-ENGINE.json``.
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from fun_audio_chat.tiny import tiny_processor  # noqa: E402
from fun_audio_chat.trainers import FunAudioChatDPOConfig, FunAudioChatDPOTrainer  # noqa: E402
from fun_audio_chat.trainers.distributed import (  # noqa: E402
    deepspeed_training_arguments,
    fsdp2_training_arguments,
    release_distributed_engine,
)
from tests.trainers.dpo_helpers import synthetic_rows, tiny_model  # noqa: E402
from tests.trainers.sharded_worker import full_state, skip_shared_memory_kernel  # noqa: E402


def engine_arguments(engine: str, model) -> dict:
    if engine == "fsdp2":
        return {**fsdp2_training_arguments(model), "use_cpu": True}
    if engine in ("zero2", "zero3"):
        skip_shared_memory_kernel()
        return {**deepspeed_training_arguments(int(engine[-1]), zero_allow_untested_optimizer=True), "use_cpu": False}
    if engine == "single":
        return {"use_cpu": True}
    raise ValueError(engine)


def dpo_arguments(output_dir, per_device_train_batch_size: int, **engine) -> FunAudioChatDPOConfig:
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=per_device_train_batch_size,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
        beta=0.1,
        **engine,
    )
    if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__:  # older transformers 5.x
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
    return FunAudioChatDPOConfig(**kwargs)


def train(engine: str, model, out: Path) -> None:
    from datasets import Dataset

    batch = 2 if engine == "single" else 1
    args = dpo_arguments(out / engine, batch, **engine_arguments(engine, model))
    rows = synthetic_rows(2, seed=0)[:4]
    trainer = FunAudioChatDPOTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_processor()
    )
    trainer.train()
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        state = full_state(trainer, model)  # gathered on every process
    else:
        state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    if trainer.args.process_index == 0:
        state.pop("audio_invert_tower.lm_head.weight", None)
        save_file(state, str(out / f"dpo-{engine}.safetensors"))
        report = {
            "world_size": trainer.args.world_size,
            "wrapper": type(trainer.model_wrapped).__name__,
            "deepspeed": trainer.is_deepspeed_enabled,
            "fsdp": trainer.is_fsdp_enabled,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
        (out / f"dpo-{engine}.json").write_text(json.dumps(report))
    release_distributed_engine(trainer)


def main():
    engines, out = sys.argv[1].split(","), Path(sys.argv[2])
    # every model is built before any engine's arguments exist (under ZeRO-3 they would make loading partition it)
    models = {engine: tiny_model(0) for engine in engines}
    for engine in engines:
        train(engine, models[engine], out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
