"""Core-Cocktail training (docs/official-format.md#method): stage 1, merge with the base LLM, stage 2.

* :class:`CoreCocktailCallback` -- a ``TrainerCallback`` that merges the model being trained with the base LLM
  in place (``M = alpha * M1 + (1 - alpha) * M0``) at the end of training or at a chosen step, and can save
  (atomically, with a manifest) and push the merged checkpoint.
* :func:`run_core_cocktail` -- the two-stage recipe: stage 1 (cosine LR 1e-4 -> 1e-5), the merge, stage 2
  (cosine LR 1e-5 -> 1e-6), with every ``TrainingArguments`` field overridable per stage. It resumes from any
  point without redoing or skipping work:

  ========================  ==============================================================================
  interrupted ...           on the next call
  ========================  ==============================================================================
  during stage 1            stage 1 resumes from its last checkpoint (``<output_dir>/stage1/checkpoint-*``)
  after stage 1, pre-merge  stage 1 resumes from its final checkpoint (no step left), then merges
  after the merge           the merged weights are reloaded from ``<output_dir>/merged`` (its manifest is the
                            marker: the merge is never redone), stage 2 starts
  during stage 2            stage 2 resumes from its last checkpoint (``<output_dir>/stage2/checkpoint-*``)
  after stage 2             the final weights are reloaded from ``<output_dir>/final``; nothing is trained
  ========================  ==============================================================================

  Resumption needs ``save_strategy="steps"`` (the default here); with ``"no"`` an interrupted stage restarts.

Works unchanged under ``torchrun`` / ``accelerate launch`` data parallelism and DeepSpeed ZeRO-1/2 (parameters
are replicated, so every process merges the same numbers in place; process 0 writes). Under engines that shard the
parameters (DeepSpeed ZeRO-3, FSDP) stage 1 ends with ``save_model`` (the engine gathers the full weights), process 0
merges that checkpoint on disk while the others wait, and stage 2 trains a model loaded from the merge (see
``docs/distributed.md``).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .merging import SafetensorsCheckpoint, merge_weights, read_manifest, save_merged_model
from .sft import FunAudioChatTrainer

logger = logging.getLogger(__name__)

STATE_FILE = "core_cocktail_state.json"


def _unwrap_distributed(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel-style ``.module`` wrappers (a PEFT model stays a PEFT model)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class CoreCocktailCallback(TrainerCallback):
    """Merge the trained model with the base LLM in place: ``M = alpha * M1 + (1 - alpha) * M0``.

    Args:
        base: the original LLM ``M0``: a checkpoint path / Hub id (read one tensor at a time), a model or a
            state dict. Its ``model.*``/``lm_head.*`` keys map onto ``language_model.*``.
        alpha: weight of the trained model (0.5 in the paper; smaller keeps more of the base).
        merge_at_step: merge right after this optimizer step; ``None`` merges when training ends.
        save_dir: save the merged model there (``save_pretrained`` + processor + ``merge_manifest.json``),
            atomically, from the main process.
        push_to_hub: also upload ``save_dir`` (or a temporary save) to ``hub_model_id``.
        hub_model_id / hub_private / hub_token: Hub target of the push.
        merge_kwargs: extra arguments of :func:`merge_weights` (``key_map``, ``on_shape_mismatch`` ...).

    Resuming a run never merges twice: the Trainer saves a step's checkpoint after ``on_step_end``, so the
    checkpoint of ``merge_at_step`` already holds merged weights and training resumes after that step; with
    ``merge_at_step=None`` the merge happens after the last checkpoint was written. (The decision depends only
    on the step, so the callback keeps no state in checkpoints.)
    Under DeepSpeed/FSDP mixed precision, merge at the end of training (the default): a mid-training merge of
    the module weights would be overwritten by the optimizer's fp32 master copy.
    """

    def __init__(
        self,
        base: Any,
        alpha: float = 0.5,
        merge_at_step: int | None = None,
        save_dir: str | os.PathLike | None = None,
        push_to_hub: bool = False,
        hub_model_id: str | None = None,
        hub_private: bool | None = None,
        hub_token: str | None = None,
        merge_kwargs: Mapping[str, Any] | None = None,
    ):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if merge_at_step is not None and merge_at_step < 1:
            raise ValueError("merge_at_step counts optimizer steps and must be >= 1")
        if push_to_hub and not hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id")
        self.base = base
        self.alpha = float(alpha)
        self.merge_at_step = merge_at_step
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.push_to_hub = push_to_hub
        self.hub_model_id = hub_model_id
        self.hub_private = hub_private
        self.hub_token = hub_token
        self.merge_kwargs = dict(merge_kwargs or {})
        self.merged = False
        self.manifest: dict | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.merge_at_step is not None and not self.merged and state.global_step == self.merge_at_step:
            self.merge(model, args=args, state=state, processing_class=kwargs.get("processing_class"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.merge_at_step is None and not self.merged:
            self.merge(model, args=args, state=state, processing_class=kwargs.get("processing_class"))
        return control

    def merge(self, model: nn.Module, args=None, state=None, processing_class=None) -> dict:
        """Merge ``model`` in place now (all processes), then save / push (main process)."""
        if model is None:
            raise ValueError("CoreCocktailCallback needs the model (Trainer passes it to callbacks)")
        model = _unwrap_distributed(model)
        if hasattr(model, "peft_config"):
            raise TypeError(
                "Core-Cocktail merges full weights; call merge_and_unload() on the PEFT model first, or merge on disk."
            )
        show = not (getattr(args, "disable_tqdm", False)) and PartialState().is_main_process
        _, manifest = merge_weights(model, self.base, self.alpha, show_progress=show, **self.merge_kwargs)
        manifest["global_step"] = getattr(state, "global_step", None)
        self.manifest = manifest
        self.merged = True
        logger.info("Core-Cocktail: merged %d tensors with the base (alpha=%s)", len(manifest["merged"]), self.alpha)
        is_main = state.is_world_process_zero if state is not None else PartialState().is_main_process
        if self.save_dir is not None or self.push_to_hub:
            if is_main:
                target = self.save_dir
                tmp = None
                if target is None:
                    tmp = tempfile.TemporaryDirectory()
                    target = Path(tmp.name) / "merged"
                manifest["output_dir"] = str(target)
                save_merged_model(model, target, manifest, processing_class=processing_class, overwrite=True)
                if self.push_to_hub:
                    self._push(target)
                if tmp is not None:
                    tmp.cleanup()
            PartialState().wait_for_everyone()
        return manifest

    def _push(self, folder: Path) -> None:
        from ..hub import push_folder_to_hub

        # push_folder_to_hub creates the repo if needed and adds the model card (with the merge manifest).
        push_folder_to_hub(
            folder,
            self.hub_model_id,
            private=self.hub_private,
            token=self.hub_token,
            commit_message=f"Core-Cocktail merge (alpha={self.alpha})",
        )


# ----------------------------------------------------------------------------------------------------------------
# two-stage runner

STAGE1_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr": 1e-5},
    "warmup_steps": 0,
    "save_strategy": "steps",
    "save_steps": 500,
    "logging_steps": 10,
    "remove_unused_columns": False,
}
STAGE2_DEFAULTS: dict[str, Any] = {
    **STAGE1_DEFAULTS,
    "learning_rate": 1e-5,
    "lr_scheduler_kwargs": {"min_lr": 1e-6},
}


def core_cocktail_training_arguments(
    stage: int, output_dir: str | os.PathLike, overrides: Mapping[str, Any] | TrainingArguments | None = None
) -> TrainingArguments:
    """``TrainingArguments`` of a Core-Cocktail stage: the stage defaults (``STAGE1_DEFAULTS`` /
    ``STAGE2_DEFAULTS``) updated with ``overrides``. A ``TrainingArguments`` is used as it is, except that its
    ``output_dir`` becomes the stage directory."""
    if stage not in (1, 2):
        raise ValueError("stage must be 1 or 2")
    if isinstance(overrides, TrainingArguments):
        args = copy.deepcopy(overrides)
        args.output_dir = str(output_dir)
        return args
    kwargs = copy.deepcopy(STAGE1_DEFAULTS if stage == 1 else STAGE2_DEFAULTS)
    overrides = dict(overrides or {})
    # min_lr given at the top level is a convenience for lr_scheduler_kwargs
    if "min_lr" in overrides:
        kwargs["lr_scheduler_kwargs"] = {"min_lr": overrides.pop("min_lr")}
    # another scheduler type does not take the default min_lr
    if (
        "lr_scheduler_type" in overrides
        and "lr_scheduler_kwargs" not in overrides
        and "min_lr" not in str(overrides["lr_scheduler_type"])
    ):
        kwargs["lr_scheduler_kwargs"] = {}
    kwargs.update(overrides)
    kwargs["output_dir"] = str(output_dir)
    scheduler_kwargs = dict(kwargs.get("lr_scheduler_kwargs") or {})
    if "min_lr" in scheduler_kwargs and "min_lr_rate" not in scheduler_kwargs:
        # The same floor as a ratio of the peak: transformers' `min_lr` reads `optimizer.defaults`, which the
        # DeepSpeed optimizer does not have; `min_lr_rate` works with every optimizer.
        scheduler_kwargs["min_lr_rate"] = float(scheduler_kwargs.pop("min_lr")) / float(kwargs["learning_rate"])
        kwargs["lr_scheduler_kwargs"] = scheduler_kwargs
    return TrainingArguments(**kwargs)


@dataclass
class CoreCocktailResult:
    """What :func:`run_core_cocktail` did. ``stage1_metrics``/``stage2_metrics`` are ``None`` for stages
    skipped because an earlier call completed them."""

    model: nn.Module
    output_dir: Path
    merged_dir: Path
    final_dir: Path
    manifest: dict | None
    stage1_metrics: dict | None = None
    stage2_metrics: dict | None = None
    log_history: dict[str, list] = field(default_factory=dict)


def _read_state(output_dir: Path) -> dict:
    p = output_dir / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_state(output_dir: Path, state: dict) -> None:
    if not PartialState().is_main_process:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, output_dir / STATE_FILE)


@torch.no_grad()
def load_weights_into(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy a safetensors checkpoint into ``model``'s parameters tensor by tensor (low memory).

    Keys missing from the checkpoint must be tied weights; unknown keys are an error.
    """
    model = _unwrap_distributed(model)
    reader = SafetensorsCheckpoint(checkpoint)
    named = model.state_dict(keep_vars=True)
    unexpected = [k for k in reader.keys() if k not in named]
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    import re

    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ignore)]
    if unexpected:
        raise ValueError(f"checkpoint {checkpoint} has tensors the model does not: {unexpected[:5]}")
    loaded_ids = set()
    for name in reader.keys():
        if name in named:
            target = named[name]
            target.data.copy_(reader.get(name).to(device=target.device, dtype=target.dtype))
            loaded_ids.add(id(target))
    missing = [k for k, v in named.items() if id(v) not in loaded_ids and not k.endswith("inv_freq")]
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks tensors of the model: {missing[:5]}")


def _release_trainer(trainer) -> None:
    """Drop a finished Trainer's DDP/DeepSpeed/FSDP wrapper and optimizer so the next stage wraps the model afresh."""
    from .distributed import release_distributed_engine

    try:
        trainer.accelerator.free_memory()
    except Exception:  # pragma: no cover - best effort
        pass
    trainer.model_wrapped = None
    trainer.optimizer = None
    trainer.lr_scheduler = None
    release_distributed_engine(trainer)
    gc.collect()


def _finished_checkpoint(stage_dir: Path) -> Path | None:
    """The stage's last checkpoint when it was written at the stage's final step (nothing left to train).

    Resuming ``Trainer.train`` from such a checkpoint runs one optimizer step more than the uninterrupted run, so
    the runner loads its weights instead.
    """
    last = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
    if last is None or not (Path(last) / "trainer_state.json").is_file():
        return None
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    max_steps, step = int(state.get("max_steps") or 0), int(state.get("global_step") or 0)
    return Path(last) if max_steps > 0 and step >= max_steps else None


def _parameter_sharding(args: TrainingArguments) -> str | None:
    """``"FSDP"`` or ``"ZeRO-3"`` when the stage's engine shards the parameters (no process holds a whole tensor),
    else ``None``. Such a stage can only hand its weights to the merge through ``save_model``, so its settings must
    make ``save_model`` write full weights; otherwise this raises before anything trains."""
    if args.fsdp:
        state_dict_type = str((args.fsdp_config or {}).get("state_dict_type", "FULL_STATE_DICT"))
        if "FULL_STATE_DICT" not in state_dict_type:
            raise ValueError(
                f"run_core_cocktail under FSDP merges the weights that save_model writes, and with state_dict_type "
                f"{state_dict_type!r} it writes none; use fsdp_config={{'state_dict_type': 'FULL_STATE_DICT'}} "
                "(fsdp2_training_arguments sets it)."
            )
        return "FSDP"
    config = args.deepspeed
    if isinstance(config, (str, os.PathLike)):
        config = json.loads(Path(config).read_text())
    zero = ((config or {}).get("zero_optimization") or {}) if isinstance(config, Mapping) else {}
    if int(zero.get("stage", 0) or 0) < 3:
        return None
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "run_core_cocktail under DeepSpeed ZeRO-3 merges the weights that save_model writes, which needs "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save=true in the DeepSpeed config "
            "(deepspeed_config(3) sets it)."
        )
    return "ZeRO-3"


def _reload_for_stage2(
    model: nn.Module, merged_dir: Path, settings: Mapping[str, tuple[bool, torch.dtype]]
) -> nn.Module:
    """A new model with the merged weights, for stage 2 after a stage 1 whose engine sharded ``model`` in place.

    Loaded with ``from_pretrained`` (under ZeRO-3 transformers partitions it while loading). ``settings`` maps each
    parameter name to ``(requires_grad, dtype)`` as ``model`` had them before stage 1; the new model gets the same."""
    base = _unwrap_distributed(model)
    # FSDP2 swaps the module's class for a generated subclass named FSDP<Class>: load with the original class
    model_cls = next(cls for cls in type(base).__mro__ if not cls.__name__.startswith("FSDP"))
    dtype = next(iter(settings.values()))[1]
    fresh = model_cls.from_pretrained(str(merged_dir), dtype=dtype)
    for name, parameter in fresh.named_parameters():
        if name in settings:
            parameter.requires_grad_(settings[name][0])
    return fresh


def _completed_stage_history(checkpoint: Path) -> list:
    return list(json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", []))


def run_core_cocktail(
    model: nn.Module,
    base: Any,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    data_collator: Callable | None = None,
    eval_dataset=None,
    alpha: float = 0.5,
    stage1_args: Mapping[str, Any] | TrainingArguments | None = None,
    stage2_args: Mapping[str, Any] | TrainingArguments | None = None,
    stage2_train_dataset=None,
    processing_class=None,
    callbacks: Sequence[TrainerCallback] | None = None,
    trainer_cls: type = FunAudioChatTrainer,
    trainer_kwargs: Mapping[str, Any] | None = None,
    resume: bool = True,
    merge_kwargs: Mapping[str, Any] | None = None,
) -> CoreCocktailResult:
    """Core-Cocktail: stage 1 fine-tune, merge with the base LLM, stage 2 fine-tune (docs/official-format.md#method).

    Args:
        model: the model to train (trained and merged in place).
        base: the original LLM ``M0`` (checkpoint path, Hub id, model or state dict), see :func:`merge_weights`.
        train_dataset / data_collator / eval_dataset / processing_class: as for ``Trainer``;
            ``stage2_train_dataset`` optionally gives stage 2 its own data.
        output_dir: ``stage1/``, ``merged/``, ``stage2/``, ``final/`` and ``core_cocktail_state.json`` go here.
        alpha: merge weight of the stage-1 model.
        stage1_args / stage2_args: ``TrainingArguments`` overrides (a dict, which may use ``min_lr=`` as a
            shortcut) or complete ``TrainingArguments``. Defaults: cosine with ``min_lr``, LR 1e-4 -> 1e-5 then
            1e-5 -> 1e-6, no warmup, checkpoints every 500 steps.
        callbacks / trainer_cls / trainer_kwargs: passed to both stages' trainers.
        resume: continue from what an earlier call left in ``output_dir`` (see the module docstring).
        merge_kwargs: extra :func:`merge_weights` arguments.

    Returns:
        a :class:`CoreCocktailResult`; ``model`` holds the final weights. When stage 1 runs under an engine that
        shards the parameters (FSDP, DeepSpeed ZeRO-3), stage 1 ends with ``save_model`` (full weights, in
        ``stage1/final``), process 0 merges that checkpoint on disk into ``merged/`` while the others wait, and
        stage 2 trains a new model loaded from ``merged/``: ``result.model`` is then that model as the engine leaves
        it (sharded over the processes) and ``final/`` holds the whole final weights.
    """
    if hasattr(_unwrap_distributed(model), "peft_config"):
        raise TypeError(
            "run_core_cocktail merges full weights with the base LLM, and a PEFT model trains (and saves) only its "
            "adapter; call merge_and_unload() on the PEFT model first."
        )
    output_dir = Path(output_dir)
    stage1_dir, stage2_dir = output_dir / "stage1", output_dir / "stage2"
    merged_dir, final_dir = output_dir / "merged", output_dir / "final"
    args1 = core_cocktail_training_arguments(1, stage1_dir, stage1_args)
    args2 = core_cocktail_training_arguments(2, stage2_dir, stage2_args)
    stage1_sharding = _parameter_sharding(args1)
    _parameter_sharding(args2)
    trainer_kwargs = dict(trainer_kwargs or {})
    state = _read_state(output_dir) if resume else {}
    if not resume and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; pass resume=True to continue from it or use a new dir")
    result = CoreCocktailResult(
        model=model,
        output_dir=output_dir,
        merged_dir=merged_dir,
        final_dir=final_dir,
        manifest=read_manifest(merged_dir),
    )

    def make_trainer(model, args, dataset, extra_callbacks):
        return trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), *extra_callbacks],
            **trainer_kwargs,
        )

    if state.get("status") == "done" and (final_dir / "config.json").is_file():
        logger.info("Core-Cocktail already finished in %s; loading the final weights", output_dir)
        load_weights_into(model, final_dir)
        return result

    # ---- stage 1 + merge -------------------------------------------------------------------------------------
    if result.manifest is None:
        # (whether each parameter trains and its dtype, for a stage-2 model reloaded after a sharded stage 1)
        settings = {n: (p.requires_grad, p.dtype) for n, p in _unwrap_distributed(model).named_parameters()}
        merger = CoreCocktailCallback(base, alpha=alpha, save_dir=merged_dir, merge_kwargs=merge_kwargs)
        trainer = make_trainer(model, args1, train_dataset, [] if stage1_sharding else [merger])
        last = get_last_checkpoint(str(stage1_dir)) if resume and stage1_dir.is_dir() else None
        finished = _finished_checkpoint(stage1_dir) if resume else None
        _write_state(output_dir, {"status": "stage1", "alpha": alpha})
        if finished is not None:
            logger.info("Core-Cocktail: stage 1 finished at %s; merging it", finished)
            result.log_history["stage1"] = _completed_stage_history(finished)
            stage1_weights = finished
            if not stage1_sharding:
                load_weights_into(model, finished)
                merger.merge(model, args=args1, state=None, processing_class=processing_class)
        else:
            if last:
                logger.info("Core-Cocktail: resuming stage 1 from %s", last)
            out = trainer.train(resume_from_checkpoint=last)
            result.stage1_metrics = dict(out.metrics)
            result.log_history["stage1"] = list(trainer.state.log_history)
            stage1_weights = stage1_dir / "final"
            if stage1_sharding:
                trainer.save_model(str(stage1_weights))  # every process takes part in gathering the full weights
        if stage1_sharding:
            # No process holds whole tensors: process 0 merges the saved checkpoint on disk; the others wait.
            if PartialState().is_main_process:
                _, manifest = merge_weights(
                    stage1_weights,
                    base,
                    alpha,
                    output_dir=merged_dir,
                    overwrite=True,
                    show_progress=not args1.disable_tqdm,
                    **(merge_kwargs or {}),
                )
                logger.info("Core-Cocktail: merged %d tensors with the base on disk", len(manifest["merged"]))
        elif not merger.merged:  # pragma: no cover - on_train_end always fires
            raise RuntimeError("stage 1 ended without the Core-Cocktail merge")
        PartialState().wait_for_everyone()
        result.manifest = read_manifest(merged_dir) or merger.manifest
        _write_state(output_dir, {"status": "merged", "alpha": alpha, "merged_dir": str(merged_dir)})
        _release_trainer(trainer)
        del trainer
        gc.collect()
        if stage1_sharding and finished is None:
            model = _reload_for_stage2(model, merged_dir, settings)
        elif stage1_sharding:
            load_weights_into(model, merged_dir)
    else:
        if float(result.manifest.get("alpha", alpha)) != float(alpha):
            logger.warning(
                "the merge in %s used alpha=%s, not %s; keeping it", merged_dir, result.manifest.get("alpha"), alpha
            )
        last2 = get_last_checkpoint(str(stage2_dir)) if stage2_dir.is_dir() else None
        if last2 is None:
            logger.info("Core-Cocktail: stage 1 and the merge are done; loading %s", merged_dir)
            load_weights_into(model, merged_dir)

    # ---- stage 2 ---------------------------------------------------------------------------------------------
    result.model = model
    trainer = make_trainer(
        model, args2, stage2_train_dataset if stage2_train_dataset is not None else train_dataset, []
    )
    last2 = get_last_checkpoint(str(stage2_dir)) if resume and stage2_dir.is_dir() else None
    finished2 = _finished_checkpoint(stage2_dir) if resume else None
    _write_state(output_dir, {"status": "stage2", "alpha": alpha, "merged_dir": str(merged_dir)})
    if finished2 is not None:
        logger.info("Core-Cocktail: stage 2 finished at %s; loading it", finished2)
        load_weights_into(model, finished2)
        result.log_history["stage2"] = _completed_stage_history(finished2)
        if PartialState().is_main_process:  # no engine was started: save the plain module
            _unwrap_distributed(model).save_pretrained(str(final_dir))
            if processing_class is not None:
                processing_class.save_pretrained(str(final_dir))
    else:
        if last2:
            logger.info("Core-Cocktail: resuming stage 2 from %s", last2)
        out = trainer.train(resume_from_checkpoint=last2)
        result.stage2_metrics = dict(out.metrics)
        result.log_history["stage2"] = list(trainer.state.log_history)
        trainer.save_model(str(final_dir))
    PartialState().wait_for_everyone()
    _write_state(
        output_dir, {"status": "done", "alpha": alpha, "merged_dir": str(merged_dir), "final_dir": str(final_dir)}
    )
    _release_trainer(trainer)
    return result


__all__ = [
    "CoreCocktailCallback",
    "CoreCocktailResult",
    "STAGE1_DEFAULTS",
    "STAGE2_DEFAULTS",
    "core_cocktail_training_arguments",
    "load_weights_into",
    "run_core_cocktail",
]
