"""Supervised fine-tuning with ``transformers.Trainer``.

* :class:`FunAudioChatTrainer` -- a ``Trainer`` that logs the text and the speech loss separately
  (``text_loss`` / ``speech_loss`` next to ``loss``; ``eval_text_loss`` / ``eval_speech_loss`` in evaluation), the
  way TRL's trainers log their metrics (stored per step, averaged over the logging window in ``log``), and normalises **both** streams correctly under gradient accumulation and data parallelism: it counts the
  text targets and the speech targets of the whole accumulated (and, with ``average_tokens_across_devices``,
  all-process) batch and passes ``num_items_in_batch={"text": n_text, "speech": n_speech}`` to the model, whose
  losses are then ``sum / count`` per stream. The result equals one big batch, whatever the micro-batching.
* :func:`count_loss_items` -- the number of text and speech targets of a batch, without running the model.
* :func:`freeze_for_stage` -- which parts train in which stage (pre-alignment, Core-Cocktail, LLM only, ...).
* :func:`sft_training_arguments` -- ``TrainingArguments`` with defaults that suit this model.

A plain ``transformers.Trainer`` also runs (the model returns ``loss = text_loss + speech_loss`` and accepts
``num_items_in_batch``), but it passes a single text-target count: the speech loss then stays a per-micro-batch
mean that is summed, not averaged, over gradient-accumulation steps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .unwrapping import unwrap_model

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# freezing

#: Top-level parts of :class:`FunAudioChatForConditionalGeneration`.
#: ``continuous_audio_tower``: Whisper-style speech encoder + its projection (the "adapter" to the LLM width);
#: ``audio_tower``: discrete speech-token encoder (DRSR grouping) incl. the continuous-feature matching layer;
#: ``audio_invert_tower``: the Speech Refined Head (its output head is tied to ``audio_tower.embed_tokens``);
#: ``language_model``: the Qwen3 LLM.
STAGE_TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    # docs/official-format.md#method (1): encoder, adapter and SRH learn to talk to a frozen LLM.
    "pre_alignment": ("continuous_audio_tower", "audio_tower", "audio_invert_tower"),
    # docs/official-format.md#method (2): full fine-tune (LLM + encoder + adapter, and the SRH whose loss is part of the objective).
    "core_cocktail": ("continuous_audio_tower", "audio_tower", "audio_invert_tower", "language_model"),
    "full": ("continuous_audio_tower", "audio_tower", "audio_invert_tower", "language_model"),
    "llm": ("language_model",),
    "srh": ("audio_invert_tower",),
    "audio_encoder": ("continuous_audio_tower", "audio_tower"),
    "speech_io": ("continuous_audio_tower", "audio_tower", "audio_invert_tower"),
}
STAGE_ALIASES = {"pre-alignment": "pre_alignment", "core-cocktail": "core_cocktail", "sft": "full", "dpo": "full"}

#: Stored in the official checkpoint but never used by the forward: always frozen (also keeps DDP's
#: unused-parameter detection unnecessary).
ALWAYS_FROZEN = ("continuous_audio_tower.audio_bos_eos_token.",)


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def freeze_for_stage(model: nn.Module, stage: str | Iterable[str], *, verbose: bool = True) -> dict[str, Any]:
    """Set ``requires_grad`` for a training stage and return a summary.

    Args:
        model: a :class:`FunAudioChatForConditionalGeneration` (or a PEFT wrapper's base model).
        stage: one of :data:`STAGE_TRAINABLE_PARTS` (``"pre_alignment"``: encoder, adapter and SRH train with the
            LLM frozen; ``"core_cocktail"``/``"full"``: everything; ``"llm"``; ``"srh"``; ``"audio_encoder"``;
            ``"speech_io"``) or an iterable of parameter-name prefixes to train.

    A parameter shared by several names (the SRH head tied to the speech embedding) trains if any of its names
    is in a trainable part. Unused checkpoint tensors (:data:`ALWAYS_FROZEN`) are always frozen.
    """
    if isinstance(stage, str):
        key = STAGE_ALIASES.get(stage, stage)
        if key not in STAGE_TRAINABLE_PARTS:
            raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_TRAINABLE_PARTS)} or pass prefixes")
        parts = STAGE_TRAINABLE_PARTS[key]
    else:
        parts = tuple(stage)
        key = "custom"
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p
    trainable = frozen = 0
    trainable_names: list[str] = []
    for pid, p in params.items():
        names = names_of[pid]
        train = any(_matches(n, parts) for n in names) and not any(_matches(n, ALWAYS_FROZEN) for n in names)
        p.requires_grad_(train)
        if train:
            trainable += p.numel()
            trainable_names.append(names[0])
        else:
            frozen += p.numel()
    if trainable == 0:
        raise ValueError(f"stage {stage!r} leaves no trainable parameter in {type(model).__name__}")
    summary = {
        "stage": key,
        "trainable_parts": list(parts),
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "trainable_names": trainable_names,
    }
    if verbose:
        logger.info(
            "stage %s: %s trainable / %s frozen parameters (%s)", key, f"{trainable:,}", f"{frozen:,}", ", ".join(parts)
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------
# loss-item counting


def count_loss_items(batch: Mapping[str, Any], model) -> tuple[int, int]:
    """``(n_text, n_speech)``: how many text and speech targets a batch contributes to the two losses.

    Delegates to the model's :meth:`count_loss_targets`, which builds the labels exactly as the training forward
    does (docs/official-format.md#training-forward) without running any network.
    """
    inputs = {key: torch.as_tensor(value) for key, value in batch.items() if isinstance(value, (torch.Tensor, list))}
    if "input_ids" not in inputs:
        return 0, 0
    return unwrap_model(model).count_loss_targets(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# Trainer


class FunAudioChatTrainer(Trainer):
    """``Trainer`` for Fun-Audio-Chat SFT: separate text/speech loss logging and per-stream normalisation.

    Use it exactly like ``Trainer`` (``FunAudioChatTrainer(model=model, args=args, train_dataset=ds,
    data_collator=collator)``). Logged keys: ``loss`` (= text + speech), ``text_loss``, ``speech_loss``; in
    evaluation ``eval_text_loss`` and ``eval_speech_loss`` next to ``eval_loss``.
    """

    #: The per-stream losses of the model's output that are logged.
    STREAM_LOSSES = ("text_loss", "speech_loss")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # As in TRL's trainers: one value per loss computation, averaged and emitted when logging.
        self.stream_loss_values: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from .distributed import resolve_distributed_engine

        resolve_distributed_engine(self)

    # --- counting -----------------------------------------------------------------------------------
    def _fun_audio_chat_config(self):
        return getattr(unwrap_model(self.model), "config", None)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The next accumulated batch, as ``Trainer`` collects it, with its text and speech target counts as
        ``num_items_in_batch`` (``{"text": n, "speech": n}``) when the model is a Fun-Audio-Chat model trained on its
        own loss; otherwise Trainer's count."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        stream_counts = self.count_stream_targets(batch_samples, device)
        return batch_samples, (num_items_in_batch if stream_counts is None else stream_counts)

    def count_stream_targets(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor] | None:
        """``{"text": n_text, "speech": n_speech}`` over the accumulated batch (and, with
        ``average_tokens_across_devices``, all processes); ``None`` when the model's own per-stream loss is not the
        one trained (a custom ``compute_loss_func``, label smoothing, another model, no labels)."""
        config = self._fun_audio_chat_config()
        if (
            self.compute_loss_func is not None
            or self.label_smoother is not None
            or config is None
            or getattr(config, "model_type", None) != "funaudiochat"
            or not batch_samples
            or "labels" not in batch_samples[0]
        ):
            return None
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            n_text, n_speech = count_loss_items(batch, self.model)
            counts += torch.tensor([n_text, n_speech])
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return {"text": counts[0], "speech": counts[1]}

    # --- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not isinstance(num_items_in_batch, dict) or not model.training:
            if isinstance(num_items_in_batch, dict):
                num_items_in_batch = None  # evaluation: plain per-batch means
            if self.compute_loss_func is not None or self.label_smoother is not None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.loss_is_scaled_for_ga = False
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
            self._store_stream_losses(outputs, model.training, scale=1.0, global_share=False)
            return (loss, outputs) if return_outputs else loss

        counts = {k: v.clamp(min=1) if torch.is_tensor(v) else max(int(v), 1) for k, v in num_items_in_batch.items()}
        outputs = model(**inputs, num_items_in_batch=counts)
        loss = outputs["loss"]
        # Each process normalised by the all-process count; DDP averages gradients, so undo the 1/world.
        gathered = self.args.average_tokens_across_devices and self.args.world_size > 1
        if gathered:
            loss = loss * float(self.accelerator.num_processes)
        self.loss_is_scaled_for_ga = True
        # Each micro-batch's losses are its share of the accumulated batch's: times the number of micro-batches,
        # their mean over the step is the step's loss.
        self._store_stream_losses(
            outputs, training=True, scale=float(self.current_gradient_accumulation_steps), global_share=gathered
        )
        return (loss, outputs) if return_outputs else loss

    def _store_stream_losses(self, outputs, training: bool, scale: float, global_share: bool) -> None:
        """Store this batch's text and speech losses (all processes') under ``self.stream_loss_values[mode]``.

        ``global_share``: each process's losses are its share of the all-process mean (summed over processes);
        otherwise they are per-process means (averaged).
        """
        if not isinstance(outputs, Mapping) or all(outputs.get(name) is None for name in self.STREAM_LOSSES):
            return
        zero = torch.zeros((), device=self.args.device)
        values = torch.stack(
            [(outputs[name].detach().float() if outputs.get(name) is not None else zero) for name in self.STREAM_LOSSES]
        ).to(self.args.device)
        if self.args.world_size > 1:
            per_process = self.accelerator.gather(values[None])
            values = per_process.sum(0) if global_share else per_process.mean(0)
        mode = "train" if training else "eval"
        for name, value in zip(self.STREAM_LOSSES, (values * scale).tolist()):
            self.stream_loss_values[mode][name].append(value)

    def _averaged_metrics(self, mode: str) -> dict[str, float]:
        metrics = {name: sum(values) / len(values) for name, values in self.stream_loss_values[mode].items() if values}
        self.stream_loss_values[mode].clear()
        return metrics

    # --- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation metrics are added by evaluation_loop)
            logs.update({name: round(value, 6) for name, value in self._averaged_metrics("train").items()})
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        # Emitted here rather than in ``log`` so that they carry the loop's metric prefix (``eval``, ``eval_<name>``,
        # ``test``) and ``predict()``, which does not log, leaves none behind.
        self.stream_loss_values["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        metrics = self._averaged_metrics("eval")
        if output.metrics is not None:
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output


# ----------------------------------------------------------------------------------------------------------------
# arguments


SFT_DEFAULTS: dict[str, Any] = {
    # the collator needs every column; the model's forward is not the list of dataset columns
    "remove_unused_columns": False,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "learning_rate": 1e-5,
    "warmup_steps": 0,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
}


def sft_training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """``TrainingArguments`` with this model's defaults (:data:`SFT_DEFAULTS`: keep dataset columns, cosine to
    10 % of the peak LR as in the official SFT recipe); every field can be overridden."""
    kwargs = {**SFT_DEFAULTS, **overrides}
    return TrainingArguments(output_dir=str(output_dir), **kwargs)


__all__ = [
    "ALWAYS_FROZEN",
    "FunAudioChatTrainer",
    "STAGE_TRAINABLE_PARTS",
    "count_loss_items",
    "freeze_for_stage",
    "sft_training_arguments",
]
