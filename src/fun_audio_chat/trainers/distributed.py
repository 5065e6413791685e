"""FSDP2 and DeepSpeed settings for Fun-Audio-Chat training, and the start-up check that the requested engine runs.

* :func:`fsdp_wrap_classes` -- the layer classes FSDP shards one by one: the LLM's and the Speech Refined Head's
  decoder layers and the audio encoder's layers, read from the model (so the names always exist).
* :func:`fsdp2_training_arguments` -- ``TrainingArguments`` fields for FSDP2 full sharding of this model.
* :func:`deepspeed_config` -- a DeepSpeed ZeRO-2/3 config whose ``"auto"`` fields the Trainer fills in.
* :func:`resolve_distributed_engine` -- called by :class:`~fun_audio_chat.trainers.FunAudioChatTrainer` when its
  ``Accelerator`` exists: runs FSDP2 on CPU processes too (accelerate alone would silently use DDP there) and
  refuses, with the reason, any requested engine that would not actually run.

See ``docs/distributed.md`` for the launch commands that the tests run.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from torch import nn

from ..framework_compat import (
    disable_fsdp_on_cpu_processes,
    enable_fsdp_on_cpu_processes,
    layer_classes_not_to_split,
    process_state_is_configured,
    reset_accelerator_state,
)
from .unwrapping import unwrap_model

logger = logging.getLogger(__name__)


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Names of the layer classes to shard individually (from the model's ``_no_split_modules``), keeping only
    those that occur in ``model``."""
    base = unwrap_model(model)
    wanted = layer_classes_not_to_split(base)
    present = {type(module).__name__ for module in base.modules()}
    found = [name for name in wanted if name in present]
    if not found:
        raise ValueError(
            f"{type(base).__name__} has none of its layer classes {wanted}; cannot build an FSDP wrap policy."
        )
    return found


def fsdp2_training_arguments(model: nn.Module, **fsdp_config: Any) -> dict[str, Any]:
    """``TrainingArguments`` fields for FSDP2 full sharding: every LLM, SRH and audio-encoder layer is its own unit;
    the embeddings, the heads (the SRH head stays tied to the speech embedding table) and the small adapters live in
    the root unit. ``fsdp_config`` entries override the defaults."""
    config = {
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": fsdp_wrap_classes(model),
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    }
    config.update(fsdp_config)
    return {"fsdp": "full_shard", "fsdp_config": config}


def deepspeed_config(stage: int, **overrides: Any) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO ``stage`` (1, 2 or 3), meant for ``TrainingArguments(deepspeed=...)``.

    There is no ``optimizer``/``scheduler`` section: the Trainer's optimizer and LR schedule are used (so the
    Core-Cocktail LR endpoints hold). Under ZeRO-3 every parameter is partitioned
    (``stage3_param_persistence_threshold=0``; the default keeps small tensors whole, which for small models means
    nothing is sharded) and ``save_model`` gathers full weights. Top-level ``overrides`` replace entries.
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}.")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    config = {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    for key, value in overrides.items():
        if key == "zero_optimization":
            config["zero_optimization"] = {**zero, **value}
        else:
            config[key] = copy.deepcopy(value)
    return config


def deepspeed_training_arguments(stage: int, **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` fields for DeepSpeed ZeRO ``stage`` (:func:`deepspeed_config` with ``overrides``).

    On machines without a GPU, accelerate would start DeepSpeed without a process-group backend and treat every
    process as the only one. There this function sets up accelerate's process state itself (gloo, DeepSpeed) and
    asks the Trainer to use it (``accelerator_config={"use_configured_state": True}``); call it in every process
    before building the ``TrainingArguments``.
    """
    import os

    import torch

    arguments: dict[str, Any] = {"deepspeed": deepspeed_config(stage, **overrides)}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from accelerate import PartialState

        if not process_state_is_configured():
            previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend="gloo")
            finally:
                if previous is None:
                    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
                else:
                    os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
        arguments["accelerator_config"] = {"use_configured_state": True}
    return arguments


def release_distributed_engine(trainer) -> None:
    """After ``trainer`` has finished: reset accelerate's shared state so that the next Trainer of this process sets up
    its own engine (accelerate refuses a second DeepSpeed plugin otherwise, and would keep the first FSDP plugin)."""
    if not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)):
        return
    reset_accelerator_state()  # the process group itself stays up
    if getattr(trainer, "is_deepspeed_enabled", False):
        # TrainingArguments(deepspeed=...) also leaves transformers' global DeepSpeed config and accelerate's
        # environment switch behind: without undoing both, the next Trainer would start DeepSpeed whatever it asks.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    disable_fsdp_on_cpu_processes()


def resolve_distributed_engine(trainer) -> None:
    """Make the engine requested in ``trainer.args`` the one that runs, or raise saying why it cannot.

    * FSDP (``fsdp=``): accelerate enables FSDP only on accelerators; on CPU processes it would run DDP. FSDP2
      works on CPU (gloo), so it is switched on here; FSDP1 on CPU is refused.
    * DeepSpeed (``deepspeed=``): accelerate skips DeepSpeed when ``use_cpu=True``; that is refused.
    """
    args = trainer.args
    accelerator = trainer.accelerator
    state = accelerator.state
    from accelerate.utils import DistributedType

    if args.fsdp_plugin_args is not None and not trainer.is_fsdp_enabled:
        if trainer.is_deepspeed_enabled:
            raise ValueError("Both fsdp= and deepspeed= are set; choose one distributed engine.")
        plugin_args = dict(args.fsdp_plugin_args)
        version = int(plugin_args.get("fsdp_version", 1) or 1)
        if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            raise ValueError(
                f"fsdp= was requested but accelerate set up {state.distributed_type} instead of FSDP; launch with "
                "torchrun or `accelerate launch` on more than one process."
            )
        if version != 2:
            raise ValueError(
                "FSDP1 does not run on CPU processes (accelerate would silently fall back to DDP); use FSDP2: "
                "fsdp_config={'fsdp_version': 2, ...} (see fsdp2_training_arguments)."
            )
        from accelerate.utils import FullyShardedDataParallelPlugin

        # release_distributed_engine undoes it
        enable_fsdp_on_cpu_processes(state, FullyShardedDataParallelPlugin(**plugin_args))
        trainer.is_fsdp_enabled = True
        logger.info("FSDP2 on %d CPU processes (gloo)", state.num_processes)
    if args.fsdp_plugin_args is not None and trainer.is_fsdp_enabled:
        wrap = args.fsdp_plugin_args.get("transformer_cls_names_to_wrap") or []
        if isinstance(wrap, str):
            wrap = [name.strip() for name in wrap.split(",") if name.strip()]
        present = {type(module).__name__ for module in trainer.model.modules()}
        missing = [name for name in wrap if name not in present]
        if missing:
            raise ValueError(
                f"FSDP transformer_layer_cls_to_wrap names {missing}, which this model does not contain; use "
                f"{fsdp_wrap_classes(trainer.model)} (fsdp2_training_arguments sets them)."
            )
    if trainer.is_deepspeed_enabled:
        import os

        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and state.num_processes != launched:
            raise ValueError(
                f"DeepSpeed was started in {launched} processes but accelerate sees {state.num_processes}; on CPU "
                "processes build the arguments with deepspeed_training_arguments(), which sets up a gloo process group."
            )
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise ValueError(
            "deepspeed= was requested but accelerate did not start DeepSpeed (it skips DeepSpeed when use_cpu=True); "
            "remove use_cpu=True and launch with torchrun/deepspeed (on CPU-only machines DeepSpeed picks its CPU "
            "accelerator)."
        )


__all__ = [
    "deepspeed_config",
    "deepspeed_training_arguments",
    "fsdp2_training_arguments",
    "fsdp_wrap_classes",
    "release_distributed_engine",
    "resolve_distributed_engine",
]
