"""Multi-task DPO over whole spoken answers (text and speech): the trainer, on top of ``trl.DPOTrainer``.

Plain ``trl.DPOTrainer`` scores only ``outputs.logits`` and would ignore the speech the model produces. Here the
log-probability of an answer ``y`` to a prompt ``x`` is

    log pi(y | x) = text log-prob + speech_logp_weight * speech log-prob

* text log-prob: the text stream at 5 Hz, scored exactly where the training loss is
  (docs/official-format.md#training-forward: the transcript written into the ``<|AUDIO|>`` slots, then
  ``<|audio_eos|>``, ``<|im_end|>``, ``\\n``);
* speech log-prob: the Speech Refined Head's teacher-forced log-probability of the answer's 25 Hz codes
  (docs/official-format.md#training-forward: the 10 speech-BOS delay codes, the codes, the speech-EOS group).

Both are gathered here from one ordinary forward of the model (its logits and the ``shift_labels`` it scored), run
over the chosen and the rejected answers stacked into one batch (chosen rows first). The module is split as TRL splits
its DPO: the config in :mod:`.dpo_config`, the loss formulas (TRL's loss types, the text + speech combination and the
per-task weights, as pure functions of tensors) in :mod:`.dpo_losses`, the trainer here. Per-task metrics
(``rewards/<task>/chosen`` ...) come on top of TRL's.

Reference model (as in TRL): an explicit frozen ``ref_model``; ``ref_model=None`` with a PEFT model (the base with the
adapter disabled, or TRL's frozen copy of a pre-existing adapter); ``precompute_ref_log_probs=True`` (the reference
log-probs are stored in the dataset as ``ref_chosen_logps``/``ref_rejected_logps`` = ``[text, speech]``); or, with
none of these, a frozen copy of the initial model made by the trainer.

Note on the streams: the answer's speech codes also condition its text stream (each 5 Hz LLM input averages the text
embedding and the grouped speech embedding), so two answers with the same words but different speech still differ
slightly in text log-prob. ``speech_logp_weight`` weighs the SRH term only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn
from trl import DPOTrainer

from ..configuration_fun_audio_chat import AUDIO_INPUT_NAMES, TRANSCRIPT_INPUT_NAMES
from ..framework_compat import (
    DPOTrainerPrivateHooks,
    count_trained_tokens,
    prepare_trainer_inputs,
    remove_trl_fused_lm_head_patch,
    trl_metric_store,
)
from ..modeling.modeling_fun_audio_chat import gather_stream_log_probs
from .dpo_config import FunAudioChatDPOConfig
from .dpo_losses import (
    F_DIVERGENCE_TYPES,
    LOG_PROB_LOSS_TYPES,
    LOGGED_PAIR_METRICS,
    SORTING_LOSS_TYPES,
    STREAMS,
    answer_log_probs,
    f_divergence_scores,
    multi_task_preference_loss,
    pair_metrics,
    per_task_values,
    preference_loss,
)
from .preference_data import (
    BUILT_COLUMNS,
    RAW_COLUMNS,
    REF_COLUMNS,
    FunAudioChatPreferenceCollator,
)
from .unwrapping import unwrap_model

logger = logging.getLogger(__name__)

#: Batch keys the model takes (everything else in a preference batch is bookkeeping).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", *AUDIO_INPUT_NAMES, *TRANSCRIPT_INPUT_NAMES)


# -------------------------------------------------------------------------------------------------------- trainer
@contextlib.contextmanager
def _checkpointing_disabled(model: nn.Module, kwargs: dict | None):
    """Turn activation (gradient) checkpointing off for a no-grad reference pass, then restore it."""
    enabled = bool(getattr(model, "is_activation_checkpointing", False))
    if enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if enabled:
            model.activation_checkpointing_enable(kwargs)


def require_fun_audio_chat_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a :class:`FunAudioChatForConditionalGeneration` (optionally wrapped by PEFT)."""
    from ..modeling import FunAudioChatForConditionalGeneration

    base = unwrap_model(model)
    if not isinstance(base, FunAudioChatForConditionalGeneration):
        raise TypeError(
            f"FunAudioChatDPOTrainer trains FunAudioChatForConditionalGeneration models (optionally wrapped by PEFT), "
            f"not {type(base).__name__}."
        )


def remove_fused_lm_head_patch(model: nn.Module) -> None:
    """Remove the instance-level ``forward`` that ``trl.DPOTrainer`` installs (its fused LM head), if any.

    This trainer scores answers from the model's ordinary forward and never asks for TRL's fused head. The patch is
    removed because it closes over the original model's bound ``forward``: a deep copy of a patched model (e.g. the
    frozen reference made for a second trainer) would run the original model, and every new trainer would wrap the
    previous patch again.
    """
    remove_trl_fused_lm_head_patch(unwrap_model(model))


class FunAudioChatDPOTrainer(DPOTrainerPrivateHooks, DPOTrainer):
    """``trl.DPOTrainer`` that scores whole spoken answers: ``text + speech_logp_weight * speech`` log-probs.

    Args (as ``trl.DPOTrainer``, plus):
        model: a :class:`FunAudioChatForConditionalGeneration` (or a ``PeftModel`` of one, or a path to load).
        ref_model: a frozen reference model. ``None``: PEFT base with the adapter disabled (PEFT),
            precomputed log-probs (``precompute_ref_log_probs=True``), or else a frozen copy of ``model``.
        args: a :class:`FunAudioChatDPOConfig`.
        data_collator: default :class:`FunAudioChatPreferenceCollator` (built from ``processing_class``).
        train_dataset / eval_dataset: ``datasets`` of preference rows (raw or prepared; see ``docs/dpo.md``).
        processing_class: the :class:`FunAudioChatProcessor` (loaded from the model's path when omitted).
        peft_config: a ``peft.LoraConfig`` (e.g. :func:`fun_audio_chat.trainers.fun_audio_chat_lora_config`).
        speech_tokenizer: for answers given as audio clips in raw rows (an ``S3SpeechTokenizer``).

    Logged (train and ``eval_``): ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
    ``rewards/{text,speech}_margins`` (the margin's two terms), ``logps/{chosen,rejected}`` and their
    ``_text``/``_speech`` parts, ``num_tokens``, and per task ``rewards/<task>/{chosen,rejected,margins,accuracies}``
    and ``loss/<task>`` (the unweighted pair loss).
    """

    model_card_tags = ("trl", "dpo", "fun-audio-chat")

    def __init__(
        self,
        model,
        ref_model: nn.Module | None = None,
        args: FunAudioChatDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        speech_tokenizer=None,
    ):
        from accelerate.utils import is_peft_model

        if args is None:
            args = FunAudioChatDPOConfig("fun-audio-chat-dpo")
        elif not isinstance(args, FunAudioChatDPOConfig):
            raise TypeError("args must be a FunAudioChatDPOConfig (a trl.DPOConfig subclass with the speech settings).")
        if isinstance(model, str):
            from ..modeling import FunAudioChatForConditionalGeneration

            model = FunAudioChatForConditionalGeneration.from_pretrained(model, **(args.model_init_kwargs or {}))
            args.model_init_kwargs = None
        if processing_class is None:
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(model.config.name_or_path)

        require_fun_audio_chat_model(model)
        remove_fused_lm_head_patch(model)
        if ref_model is not None:
            if ref_model is model:
                raise ValueError("model and ref_model must be different objects (omit ref_model for a frozen copy).")
            require_fun_audio_chat_model(ref_model)
            remove_fused_lm_head_patch(ref_model)
        elif peft_config is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
            # TRL would reload the reference from the model's path; a frozen copy of the initial model is the same.
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)

        self.speech_logp_weight = float(args.speech_logp_weight)
        self.task_names = self._task_vocabulary(args, train_dataset, eval_dataset)
        if data_collator is None:
            data_collator = FunAudioChatPreferenceCollator(
                processing_class,
                task_names=self.task_names,
                speech_tokenizer=speech_tokenizer,
                speech_delay_tokens=args.speech_delay_tokens,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        elif isinstance(data_collator, FunAudioChatPreferenceCollator) and data_collator.task_names is None:
            data_collator.task_names = self.task_names
        self._task_weight_table = torch.tensor([args.task_weight(t) for t in self.task_names], dtype=torch.float32)
        self._task_speech_weight_table = torch.tensor(
            [args.task_speech_logp_weight(t) for t in self.task_names], dtype=torch.float32
        )
        self._task_stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        remove_fused_lm_head_patch(self.model)
        if self.ref_model is not None:
            remove_fused_lm_head_patch(self.accelerator.unwrap_model(self.ref_model))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from .distributed import resolve_distributed_engine

        # As in FunAudioChatTrainer: the requested engine runs or training is refused (on CPU processes accelerate
        # would otherwise run fsdp= as plain DDP).
        resolve_distributed_engine(self)

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def _task_vocabulary(args: FunAudioChatDPOConfig, *datasets) -> list[str]:
        """``args.tasks`` (in order), then the other tasks of ``task_weights`` and of map-style datasets, sorted."""
        from datasets import Dataset

        names: list[str] = list(args.tasks or [])
        found: set[str] = set(args.task_weights or {}) | set(args.task_speech_logp_weights or {})
        for dataset in datasets:
            parts = dataset.values() if isinstance(dataset, Mapping) else [dataset]
            for part in parts:
                if isinstance(part, Dataset) and "task" in part.column_names:
                    found.update(t for t in part.unique("task") if t is not None)
        return names + sorted(found - set(names))

    def prepare_dataset(self, dataset, name: str):
        """Checks the rows only: they are built by the collator (on the fly) or ahead of time by
        ``prepare_preference_dataset``, not tokenized here as TRL would."""
        first = next(iter(dataset))
        if "chosen_input_ids" not in first and not {"prompt", "chosen", "rejected"} <= set(first):
            raise ValueError(
                f"The {name} dataset must hold preference rows with 'prompt', 'chosen' and 'rejected' (see "
                f"docs/dpo.md) or rows built by prepare_preference_dataset; got columns {sorted(first)}."
            )
        return dataset

    def signature_columns(self) -> list[str]:
        return list(dict.fromkeys(RAW_COLUMNS + BUILT_COLUMNS + REF_COLUMNS))

    # ---------------------------------------------------------------------------------------- log-probs
    @staticmethod
    def _model_inputs(inputs: Mapping) -> dict[str, torch.Tensor]:
        return {k: inputs[k] for k in MODEL_INPUT_KEYS if inputs.get(k) is not None}

    def stream_log_probs(self, model: nn.Module, inputs: Mapping) -> dict[str, torch.Tensor]:
        """Per-row ``{"text", "speech", "text_tokens", "speech_tokens"}`` of a collated batch (2B rows).

        One ordinary forward through ``model`` as given (so DDP and PEFT wrappers see the computation), then the
        log-probs of the targets it reports (``shift_labels`` / ``speech_shift_labels``).
        """
        # return_loss=False: the forward's own cross-entropies are not part of the DPO objective.
        outputs = model(**self._model_inputs(inputs), use_cache=False, return_loss=False)
        return gather_stream_log_probs(
            outputs.logits, outputs.shift_labels, outputs.speech_logits, outputs.speech_shift_labels
        )

    def reference_stream_log_probs(self, inputs: Mapping, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The reference model's per-row stream log-probs (no gradient); see the class docstring for the sources."""
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        model = self.ref_model if model is None else model
        policy = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            if model is not None and self.accelerator.unwrap_model(model) is not policy:
                return self.stream_log_probs(self.accelerator.unwrap_model(model), inputs)
            if is_peft_model(policy):
                adapter = "ref" if "ref" in policy.peft_config else None
                with (
                    _checkpointing_disabled(policy, self.args.gradient_checkpointing_kwargs),
                    use_adapter(policy, adapter_name=adapter),
                ):
                    return self.stream_log_probs(policy, inputs)
            if model is None:
                raise ValueError(
                    "No reference: pass ref_model, use a PEFT model, or set precompute_ref_log_probs=True."
                )
            # precompute before training with the policy itself as the reference (its initial state)
            with _checkpointing_disabled(policy, self.args.gradient_checkpointing_kwargs):
                return self.stream_log_probs(policy, inputs)

    def compute_ref_log_probs(self, model, inputs):
        """Reference ``(chosen, rejected)`` log-probs, each (B, 2) = ``[text, speech]`` (TRL precompute hook)."""
        streams = self.reference_stream_log_probs(inputs, model=model)
        both = torch.stack([streams[stream] for stream in STREAMS], dim=-1).float()
        return both.chunk(2, dim=0)

    def precompute_reference_log_probs(self, dataset, name: str, batch_size: int):
        """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[text, speech]``) columns, computed over all processes.

        Replaces TRL's version, which caches through a file path that in-memory datasets draw at random per process.
        """
        from datasets import IterableDataset
        from torch.utils.data import DataLoader

        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs=True needs a map-style Dataset, not an IterableDataset.")
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        model = self.ref_model if self.ref_model is not None else self.model
        chunks = []
        for batch in loader:
            chosen, rejected = self.compute_ref_log_probs(model, batch)
            chunks.append(self.accelerator.gather_for_metrics(torch.cat([chosen, rejected], dim=-1)).cpu())
        values = torch.cat(chunks)[: len(dataset)]
        dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
        chosen, rejected = values.split(len(STREAMS), dim=-1)
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        dataset = dataset.add_column("ref_rejected_logps", rejected.tolist())
        logger.info("precomputed reference log-probs for %d %s pairs", len(dataset), name)
        return dataset

    def task_weights(self, inputs: Mapping, batch: int) -> torch.Tensor:
        """(B,) loss weight of each pair: its task's ``task_weights`` entry, else ``default_task_weight``."""
        return per_task_values(inputs.get("task_ids"), self._task_weight_table, self.args.default_task_weight, batch)

    # -------------------------------------------------------------------------------------------- loss
    def speech_weights(self, inputs: Mapping, batch: int) -> torch.Tensor:
        """(B,) speech-stream weight of each pair: its task's ``task_speech_logp_weights`` entry, else
        ``speech_logp_weight``."""
        return per_task_values(inputs.get("task_ids"), self._task_speech_weight_table, self.speech_logp_weight, batch)

    def _answers(self, streams: Mapping[str, torch.Tensor], inputs: Mapping) -> dict[str, torch.Tensor]:
        batch = streams["text"].shape[0] // 2
        return answer_log_probs(streams, self.speech_weights(inputs, batch))

    def answer_log_probs(self, model: nn.Module, inputs: Mapping) -> dict[str, torch.Tensor]:
        """Log-probs of the chosen and rejected answers of a collated batch, each (B,): ``chosen``/``rejected``
        (= ``text + w * speech`` with the pair's task speech weight ``w``), their ``_text``/``_speech`` parts,
        ``_tokens`` (scored tokens: text, plus speech unless ``w == 0``) and ``speech_weights``."""
        return self._answers(self.stream_log_probs(model, inputs), inputs)

    def reference_answer_log_probs(self, inputs: Mapping) -> dict[str, torch.Tensor]:
        """The reference's :meth:`answer_log_probs` (from the batch's precomputed columns when present)."""
        if "ref_chosen_logps" in inputs:
            both = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
            return self._answers(dict(zip(STREAMS, both.unbind(-1))), inputs)
        return self._answers(self.reference_stream_log_probs(inputs), inputs)

    def preference_loss(self, model, inputs, return_outputs: bool):
        """The multi-task DPO loss of a collated batch (what TRL's ``compute_loss`` returns), with the metrics
        logged; with ``return_outputs`` also the per-pair ``[chosen, rejected]`` rewards as ``"logits"``."""
        mode = "train" if self.model.training else "eval"
        policy = self.answer_log_probs(model, inputs)
        reference = {k: v.to(policy["chosen"]) for k, v in self.reference_answer_log_probs(inputs).items()}
        batch = policy["chosen"].shape[0]
        loss, per_pair = multi_task_preference_loss(
            policy,
            reference,
            self.task_weights(inputs, batch).to(policy["chosen"].device),
            loss_types=self.loss_types,
            loss_weights=self.loss_weights,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.args.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
        )

        # ---- metrics: TRL's names, the stream split, and per task
        metrics = pair_metrics(policy, reference, self.beta)
        task_ids = inputs.get("task_ids")
        if task_ids is None:
            task_ids = torch.full((batch,), -1, dtype=torch.long, device=per_pair.device)
        columns = {**metrics, "loss/pair": per_pair.detach(), "task_id": task_ids.to(per_pair)}
        gathered = self.accelerator.gather_for_metrics(torch.stack(list(columns.values()), dim=-1).float())
        gathered = dict(zip(columns, gathered.unbind(-1)))
        logged = trl_metric_store(self, mode)
        for name in LOGGED_PAIR_METRICS:
            logged[name].append(gathered[name].mean().item())
        num_tokens = 0
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        logged["num_tokens"] = [count_trained_tokens(self, num_tokens)]
        self._accumulate_task_stats(mode, gathered)

        if return_outputs:
            return loss, {"logits": torch.stack([metrics["rewards/chosen"], metrics["rewards/rejected"]], dim=-1)}
        return loss

    # ------------------------------------------------------------------------------------------- metrics
    #: Per-task sums kept between logging steps: the pair count, then these per-pair columns.
    _TASK_COLUMNS = {
        "chosen": "rewards/chosen",
        "rejected": "rewards/rejected",
        "margins": "rewards/margins",
        "accuracies": "rewards/accuracies",
        "loss": "loss/pair",
    }

    def _accumulate_task_stats(self, mode: str, gathered: Mapping[str, torch.Tensor]) -> None:
        if not self.task_names:
            return
        task_ids = gathered["task_id"].long()
        keep = task_ids >= 0
        columns = torch.stack(
            [torch.ones_like(gathered["task_id"])] + [gathered[name] for name in self._TASK_COLUMNS.values()], dim=-1
        )
        stats = torch.zeros(len(self.task_names), columns.shape[1], dtype=torch.float64)
        stats.index_add_(0, task_ids[keep].cpu(), columns[keep].double().cpu())
        current = self._task_stats.get(mode)
        self._task_stats[mode] = stats if current is None else current + stats

    def _task_metrics(self, mode: str) -> dict[str, float]:
        stats = self._task_stats.get(mode)
        self._task_stats[mode] = None
        if stats is None:
            return {}
        sorting = any(t in SORTING_LOSS_TYPES for t in self.loss_types)
        metrics = {}
        for index, task in enumerate(self.task_names):
            count = float(stats[index, 0])
            if count == 0:
                continue
            means = dict(zip(self._TASK_COLUMNS, (stats[index, 1:] / count).tolist()))
            for field_name in ("chosen", "rejected", "margins", "accuracies"):
                metrics[f"rewards/{task}/{field_name}"] = means[field_name]
            if not sorting:  # a sorting loss's per-pair values belong to no pair
                metrics[f"loss/{task}"] = means["loss"]
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        logged = trl_metric_store(self, mode)
        for key, value in self._task_metrics(mode).items():
            logged[key] = [value]
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        """Evaluation step. For ``compute_metrics``, ``EvalPrediction.predictions`` are the (N, 2) ``[chosen, rejected]``
        rewards and ``label_ids`` the (N,) task indices into ``trainer.task_names`` (-1: no task)."""
        inputs = prepare_trainer_inputs(self, inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.preference_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rewards = outputs["logits"]
        task_ids = inputs.get("task_ids")
        if task_ids is None:
            task_ids = torch.full((rewards.shape[0],), -1, dtype=torch.long, device=rewards.device)
        return loss.detach(), rewards, task_ids

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        # The DPO loss is a mean over pairs: no item count (Trainer then averages it over accumulation steps).
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batch_samples, None


__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOG_PROB_LOSS_TYPES",
    "MODEL_INPUT_KEYS",
    "FunAudioChatDPOConfig",
    "FunAudioChatDPOTrainer",
    "f_divergence_scores",
    "preference_loss",
    "remove_fused_lm_head_patch",
    "require_fun_audio_chat_model",
]
