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

  :func:`find_resume_point` reads which row applies from the disk (a :class:`ResumePoint`; the stage-1 rows are
  ``STAGE1`` and ``MERGE``, then ``STAGE2`` and ``DONE``); each step of the recipe is one method of the run.
  A kill while ``merged/`` is being published is finished first (``remove_stale_partial_dirs``, see
  docs/reliability.md#merges). The merge manifest's ``global_step`` is stage 1's last step however the run got there.
  Resumption needs ``save_strategy="steps"`` (the default here); with ``"no"`` an interrupted stage restarts.

Works unchanged under ``torchrun`` / ``accelerate launch`` data parallelism and DeepSpeed ZeRO-1/2 (parameters
are replicated, so every process merges the same numbers in place; process 0 writes). Under engines that shard the
parameters (DeepSpeed ZeRO-3, FSDP) stage 1 ends with ``save_model`` (the engine gathers the full weights), process 0
merges that checkpoint on disk while the others wait, and stage 2 trains a model loaded from the merge (see
``docs/distributed.md``).
"""

from __future__ import annotations

import copy
import enum
import gc
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import PartialState
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..framework_compat import checkpoint_keys_to_ignore
from .merging import SafetensorsCheckpoint, merge_weights, read_manifest, remove_stale_partial_dirs, save_merged_model
from .sft import FunAudioChatTrainer
from .unwrapping import unwrap_model

logger = logging.getLogger(__name__)

STATE_FILE = "core_cocktail_state.json"


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

    def merge(
        self, model: nn.Module, args=None, state=None, processing_class=None, global_step: int | None = None
    ) -> dict:
        """Merge ``model`` in place now (all processes), then save / push (main process).

        ``state``: the Trainer's state (its step goes into the manifest); without it (a merge of a finished
        checkpoint's weights, outside training) give that checkpoint's ``global_step``."""
        if model is None:
            raise ValueError("CoreCocktailCallback needs the model (Trainer passes it to callbacks)")
        model = unwrap_model(model, through_peft=False)
        if hasattr(model, "peft_config"):
            raise TypeError(
                "Core-Cocktail merges full weights; call merge_and_unload() on the PEFT model first, or merge on disk."
            )
        show = not (getattr(args, "disable_tqdm", False)) and PartialState().is_main_process
        _, manifest = merge_weights(model, self.base, self.alpha, show_progress=show, **self.merge_kwargs)
        manifest["global_step"] = state.global_step if state is not None else global_step
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
    model = unwrap_model(model, through_peft=False)
    reader = SafetensorsCheckpoint(checkpoint)
    named = model.state_dict(keep_vars=True)
    unexpected = [k for k in reader.keys() if k not in named]
    ignore = checkpoint_keys_to_ignore(model)
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
    base = unwrap_model(model, through_peft=False)
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


def _checkpoint_step(checkpoint: Path) -> int | None:
    """The optimizer step at which a Trainer checkpoint was written (what an uninterrupted run's state reports)."""
    step = json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step")
    return None if step is None else int(step)


class ResumePoint(enum.Enum):
    """Where :func:`run_core_cocktail` starts, read from what an earlier call left in ``output_dir``."""

    STAGE1 = "stage 1 to train (from its last checkpoint, if any), then the merge"
    MERGE = "stage 1 finished (its final checkpoint written), the merge not done"
    STAGE2 = "the merge done, stage 2 to train (from its last checkpoint, if any)"
    DONE = "both stages done: the final weights to reload"


class CoreCocktailLayout(NamedTuple):
    """The folders of a Core-Cocktail run (:meth:`under` an output directory)."""

    output_dir: Path
    stage1_dir: Path
    merged_dir: Path
    stage2_dir: Path
    final_dir: Path

    @classmethod
    def under(cls, output_dir: str | os.PathLike) -> CoreCocktailLayout:
        root = Path(output_dir)
        return cls(root, root / "stage1", root / "merged", root / "stage2", root / "final")


def find_resume_point(layout: CoreCocktailLayout, resume: bool = True) -> ResumePoint:
    """The :class:`ResumePoint` of ``layout``: the merge manifest in ``merged/`` marks the merge as done (it is
    written last, inside the atomically published folder), ``core_cocktail_state.json`` marks the end."""
    if not resume:
        return ResumePoint.STAGE1
    state = _read_state(layout.output_dir)
    if state.get("status") == "done" and (layout.final_dir / "config.json").is_file():
        return ResumePoint.DONE
    if read_manifest(layout.merged_dir) is not None:
        return ResumePoint.STAGE2
    if _finished_checkpoint(layout.stage1_dir) is not None:
        return ResumePoint.MERGE
    return ResumePoint.STAGE1


def _last_checkpoint(stage_dir: Path, resume: bool) -> str | None:
    return get_last_checkpoint(str(stage_dir)) if resume and stage_dir.is_dir() else None


@dataclass
class _CoreCocktailRun:
    """One call of :func:`run_core_cocktail`: its settings, and one method per step of the recipe."""

    layout: CoreCocktailLayout
    base: Any
    alpha: float
    args1: TrainingArguments
    args2: TrainingArguments
    make_trainer: Callable[[nn.Module, TrainingArguments, int, list], Any]
    processing_class: Any
    merge_kwargs: Mapping[str, Any]
    resume: bool
    result: CoreCocktailResult

    def write_state(self, status: str) -> None:
        state = {"status": status, "alpha": self.alpha}
        if status != "stage1":
            state["merged_dir"] = str(self.layout.merged_dir)
        if status == "done":
            state["final_dir"] = str(self.layout.final_dir)
        _write_state(self.layout.output_dir, state)

    # ---- stage 1 and the merge -----------------------------------------------------------------------------
    def stage1_and_merge(self, model: nn.Module, point: ResumePoint) -> nn.Module:
        """Train stage 1 (unless it finished) and merge it with the base; returns the model stage 2 trains."""
        self.write_state("stage1")
        if point is ResumePoint.MERGE:
            self.merge_finished_stage1(model)
            return model
        return self.train_and_merge_stage1(model)

    def merge_finished_stage1(self, model: nn.Module) -> None:
        """Resuming after stage 1's final checkpoint: merge its weights (no Trainer is built, nothing trains)."""
        finished = _finished_checkpoint(self.layout.stage1_dir)
        logger.info("Core-Cocktail: stage 1 finished at %s; merging it", finished)
        self.result.log_history["stage1"] = _completed_stage_history(finished)
        step = _checkpoint_step(finished)  # the manifest records what an uninterrupted run's state would
        if _parameter_sharding(self.args1):
            self.merge_on_disk(finished, step)
            self.after_merge()
            load_weights_into(model, self.layout.merged_dir)
            return
        load_weights_into(model, finished)
        manifest = self.merger().merge(model, args=self.args1, processing_class=self.processing_class, global_step=step)
        self.after_merge(manifest)

    def train_and_merge_stage1(self, model: nn.Module) -> nn.Module:
        """Train stage 1 (from its last checkpoint, if any), then merge: in place by the callback at the end of
        training, or on disk from ``save_model``'s full weights when the engine shards the parameters (stage 2 then
        trains a model reloaded from the merge)."""
        sharding = _parameter_sharding(self.args1)
        # whether each parameter trains and its dtype, for a stage-2 model reloaded after a sharded stage 1
        settings = {
            n: (p.requires_grad, p.dtype) for n, p in unwrap_model(model, through_peft=False).named_parameters()
        }
        if sharding:
            trainer = self.train_stage(model, 1, [])
            stage1_weights = self.layout.stage1_dir / "final"
            trainer.save_model(str(stage1_weights))  # every process takes part in gathering the full weights
            self.merge_on_disk(stage1_weights, trainer.state.global_step)
            self.after_merge()
        else:
            merger = self.merger()
            trainer = self.train_stage(model, 1, [merger])
            if not merger.merged:  # pragma: no cover - on_train_end always fires
                raise RuntimeError("stage 1 ended without the Core-Cocktail merge")
            self.after_merge(merger.manifest)
        _release_trainer(trainer)
        del trainer
        gc.collect()
        return _reload_for_stage2(model, self.layout.merged_dir, settings) if sharding else model

    def merger(self) -> CoreCocktailCallback:
        return CoreCocktailCallback(
            self.base, alpha=self.alpha, save_dir=self.layout.merged_dir, merge_kwargs=self.merge_kwargs
        )

    def merge_on_disk(self, stage1_weights: Path, global_step: int | None) -> None:
        """The merge after a stage whose engine sharded the parameters: no process holds whole tensors, so process 0
        merges the saved checkpoint on disk while the others wait."""
        if PartialState().is_main_process:
            _, manifest = merge_weights(
                stage1_weights,
                self.base,
                self.alpha,
                output_dir=self.layout.merged_dir,
                overwrite=True,
                show_progress=not self.args1.disable_tqdm,
                manifest_extra={"global_step": global_step},
                **self.merge_kwargs,
            )
            logger.info("Core-Cocktail: merged %d tensors with the base on disk", len(manifest["merged"]))

    def after_merge(self, manifest: dict | None = None) -> None:
        """Wait for the merging process; record the manifest (``manifest``: this process's own, for processes that
        cannot read process 0's disk)."""
        PartialState().wait_for_everyone()
        self.result.manifest = read_manifest(self.layout.merged_dir) or manifest
        self.write_state("merged")

    def load_merge(self, model: nn.Module) -> None:
        """Resuming after the merge: its weights, unless stage 2 has a checkpoint to resume from."""
        manifest = self.result.manifest
        if float(manifest.get("alpha", self.alpha)) != float(self.alpha):
            logger.warning(
                "the merge in %s used alpha=%s, not %s; keeping it",
                self.layout.merged_dir,
                manifest.get("alpha"),
                self.alpha,
            )
        if _last_checkpoint(self.layout.stage2_dir, resume=True):
            return
        logger.info("Core-Cocktail: stage 1 and the merge are done; loading %s", self.layout.merged_dir)
        load_weights_into(model, self.layout.merged_dir)

    # ---- stage 2 -------------------------------------------------------------------------------------------
    def stage2(self, model: nn.Module) -> None:
        """Train stage 2 (unless it finished) and write the final weights to ``final/``."""
        self.write_state("stage2")
        finished = _finished_checkpoint(self.layout.stage2_dir) if self.resume else None
        if finished is not None:
            logger.info("Core-Cocktail: stage 2 finished at %s; loading it", finished)
            load_weights_into(model, finished)
            self.result.log_history["stage2"] = _completed_stage_history(finished)
            if PartialState().is_main_process:  # no engine was started: save the plain module
                unwrap_model(model, through_peft=False).save_pretrained(str(self.layout.final_dir))
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(str(self.layout.final_dir))
            PartialState().wait_for_everyone()
            self.write_state("done")
            return
        trainer = self.train_stage(model, 2, [])
        trainer.save_model(str(self.layout.final_dir))
        PartialState().wait_for_everyone()
        self.write_state("done")
        _release_trainer(trainer)

    def train_stage(self, model: nn.Module, stage: int, extra_callbacks: list):
        """Train stage ``stage`` from its last checkpoint (if any); records its metrics and log; returns the
        Trainer (still holding the engine, for ``save_model``)."""
        args = self.args1 if stage == 1 else self.args2
        last = _last_checkpoint(Path(args.output_dir), self.resume)
        trainer = self.make_trainer(model, args, stage, extra_callbacks)
        if last:
            logger.info("Core-Cocktail: resuming stage %d from %s", stage, last)
        out = trainer.train(resume_from_checkpoint=last)
        metrics_field = "stage1_metrics" if stage == 1 else "stage2_metrics"
        setattr(self.result, metrics_field, dict(out.metrics))
        self.result.log_history[f"stage{stage}"] = list(trainer.state.log_history)
        return trainer


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
        resume: continue from what an earlier call left in ``output_dir`` (see the module docstring and
            :func:`find_resume_point`).
        merge_kwargs: extra :func:`merge_weights` arguments.

    Returns:
        a :class:`CoreCocktailResult`; ``model`` holds the final weights. When stage 1 runs under an engine that
        shards the parameters (FSDP, DeepSpeed ZeRO-3), stage 1 ends with ``save_model`` (full weights, in
        ``stage1/final``), process 0 merges that checkpoint on disk into ``merged/`` while the others wait, and
        stage 2 trains a new model loaded from ``merged/``: ``result.model`` is then that model as the engine leaves
        it (sharded over the processes) and ``final/`` holds the whole final weights.
    """
    if hasattr(unwrap_model(model, through_peft=False), "peft_config"):
        raise TypeError(
            "run_core_cocktail merges full weights with the base LLM, and a PEFT model trains (and saves) only its "
            "adapter; call merge_and_unload() on the PEFT model first."
        )
    layout = CoreCocktailLayout.under(output_dir)
    args1 = core_cocktail_training_arguments(1, layout.stage1_dir, stage1_args)
    args2 = core_cocktail_training_arguments(2, layout.stage2_dir, stage2_args)
    _parameter_sharding(args1)  # refuses sharded settings whose save_model writes no full weights
    _parameter_sharding(args2)
    if not resume and layout.output_dir.exists() and any(layout.output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; pass resume=True to continue from it or use a new dir")
    if resume and PartialState().is_main_process and layout.output_dir.is_dir():
        remove_stale_partial_dirs(layout.output_dir)  # finishes a publish of merged/ that a kill interrupted
    PartialState().wait_for_everyone()
    trainer_kwargs = dict(trainer_kwargs or {})

    def make_trainer(model, args, stage, extra_callbacks):
        dataset = stage2_train_dataset if stage == 2 and stage2_train_dataset is not None else train_dataset
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

    result = CoreCocktailResult(
        model=model,
        output_dir=layout.output_dir,
        merged_dir=layout.merged_dir,
        final_dir=layout.final_dir,
        manifest=read_manifest(layout.merged_dir),
    )
    run = _CoreCocktailRun(
        layout, base, alpha, args1, args2, make_trainer, processing_class, dict(merge_kwargs or {}), resume, result
    )
    point = find_resume_point(layout, resume)
    logger.info("Core-Cocktail in %s: %s", layout.output_dir, point.value)
    if point is ResumePoint.DONE:
        load_weights_into(model, layout.final_dir)
        return result
    if point in (ResumePoint.STAGE1, ResumePoint.MERGE):
        model = run.stage1_and_merge(model, point)
    else:
        run.load_merge(model)
    result.model = model
    run.stage2(model)
    return result


__all__ = [
    "CoreCocktailCallback",
    "CoreCocktailLayout",
    "CoreCocktailResult",
    "ResumePoint",
    "STAGE1_DEFAULTS",
    "STAGE2_DEFAULTS",
    "core_cocktail_training_arguments",
    "find_resume_point",
    "load_weights_into",
    "run_core_cocktail",
]
