"""Multi-task DPO over whole spoken answers (text and speech), on top of ``trl.DPOTrainer``.

Plain ``trl.DPOTrainer`` scores only ``outputs.logits`` and would ignore the speech the model produces. Here the
log-probability of an answer ``y`` to a prompt ``x`` is

    log pi(y | x) = text log-prob + speech_logp_weight * speech log-prob

* text log-prob: the text stream at 5 Hz, scored exactly where the training loss is (docs/official-format.md#training-forward: the transcript
  written into the ``<|AUDIO|>`` slots, then ``<|audio_eos|>``, ``<|im_end|>``, ``\\n``);
* speech log-prob: the Speech Refined Head's teacher-forced log-probability of the answer's 25 Hz codes (docs/official-format.md#training-forward:
  the 10 speech-BOS delay codes, the codes, the speech-EOS group).

Both come from :meth:`FunAudioChatForConditionalGeneration.sequence_log_probs`, run once over the chosen and the
rejected answers stacked into one batch (chosen rows first). Everything else is DPO as TRL defines it: every TRL loss
type built on sequence log-probabilities (:data:`LOG_PROB_LOSS_TYPES`, with ``loss_weights`` to combine several and
``f_divergence_type``) gives the same number as TRL for the same log-probabilities (tested against TRL's own code).
On top: per-task loss weights (``task_weights``) and per-task metrics (``rewards/<task>/chosen`` ...).

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
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from trl import DPOConfig, DPOTrainer

from .preference_data import (
    BUILT_COLUMNS,
    RAW_COLUMNS,
    REF_COLUMNS,
    FunAudioChatPreferenceCollator,
)

logger = logging.getLogger(__name__)

#: TRL 1.16 loss types that need only sequence log-probabilities (and lengths): all of them.
LOG_PROB_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
#: Losses that sort the batch: their per-pair values are not attributable to a pair (no per-task weights).
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: Batch keys the model takes (everything else in a preference batch is bookkeeping).
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "speech_ids",
    "speech_attention_mask",
    "text_ids",
    "text_attention_mask",
    "input_features",
    "feature_attention_mask",
    "feature_exist_mask",
)

_FORWARD_FLAG = "return_sequence_log_probs"


# ---------------------------------------------------------------------------------------------------- loss formulas
def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """f'(pi/pi_ref) of the f-DPO paper as TRL computes it (``reverse_kl``: the log-ratio itself)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; choose from {F_DIVERGENCE_TYPES}.")


def preference_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss (B,) of one TRL 1.16 DPO loss type from sequence log-probabilities.

    The formulas are TRL's (``DPOTrainer._compute_loss``); TRL's batch loss is ``per_pair.mean()``. ``chosen_lengths``
    / ``rejected_lengths`` (scored tokens per answer) are needed by the length-normalised losses ``ipo`` and
    ``sigmoid_norm`` and by ``sft`` (whose per-pair values are scaled so that their mean is TRL's token mean).
    """
    if loss_type not in LOG_PROB_LOSS_TYPES:
        raise ValueError(f"Unknown loss type {loss_type!r}; choose from {LOG_PROB_LOSS_TYPES}.")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores

    def lengths(value):
        if value is None:
            raise ValueError(f"loss type {loss_type!r} needs chosen_lengths and rejected_lengths.")
        return value.to(chosen_logps.dtype).clamp(min=1.0)

    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / lengths(chosen_lengths) - rejected_scores / lengths(rejected_lengths)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, device=delta.device)  # default dtype, as TRL
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            first = torch.sort(chosen_logps - rejected_logps, dim=0)[0]
            second = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        else:
            first = torch.sort(chosen_logratios, dim=0)[0]
            second = torch.sort(rejected_logratios, dim=0)[0]
        sorted_delta = first - second
        return (
            -F.logsigmoid(beta * sorted_delta) * (1 - label_smoothing)
            - F.logsigmoid(-beta * sorted_delta) * label_smoothing
        )
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (
            1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )
    if loss_type == "discopop":
        logits = delta * beta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":
        # TRL: -(mean over all chosen tokens of the batch); per pair: -logp_i * B / total tokens.
        if chosen_lengths is None:
            lengths(None)
        total = chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1.0)
        return -chosen_logps * chosen_logps.shape[0] / total
    # sigmoid_norm
    normalised = chosen_scores / lengths(chosen_lengths) - rejected_scores / lengths(rejected_lengths)
    return -F.logsigmoid(beta * normalised)


# ----------------------------------------------------------------------------------------------------------- config
@dataclass
class FunAudioChatDPOConfig(DPOConfig):
    r"""``trl.DPOConfig`` plus the speech and multi-task settings of Fun-Audio-Chat DPO.

    Parameters:
        speech_logp_weight (`float`, defaults to `1.0`):
            Weight of the SRH speech log-probability in an answer's log-probability
            (``text + speech_logp_weight * speech``). ``0`` scores the text stream only.
        task_speech_logp_weights (`dict[str, float]`, *optional*):
            ``speech_logp_weight`` per task label; tasks not listed (and rows without a task) use
            ``speech_logp_weight``. A text-preference task (chosen and rejected differ in words only) is scored on
            its text with ``0``: the transcript also conditions the SRH, so with the speech term that task is learned
            mostly through the speech stream (see ``docs/dpo.md``).
        task_weights (`dict[str, float]`, *optional*):
            Loss weight per task label (the ``task`` column). The loss is ``mean over pairs of weight(task) *
            pair loss``: a task with weight 0 contributes nothing. Tasks not listed get ``default_task_weight``.
        default_task_weight (`float`, defaults to `1.0`):
            Weight of tasks missing from ``task_weights`` and of rows without a task.
        tasks (`list[str]`, *optional*):
            Task names known in advance (per-task metrics are logged for these plus the keys of ``task_weights``
            plus every task found in map-style train/eval datasets). Needed for streaming datasets.
        speech_delay_tokens (`int`, defaults to `10`):
            Speech-BOS codes in front of every spoken answer (the official training data uses 10).
        max_length (`int`, defaults to `2048`):
            Longest chosen/rejected sequence (the official training context). Longer examples raise (raw rows) or are
            dropped by :func:`prepare_preference_dataset`; nothing is truncated, since cutting through an audio span
            would break the audio/placeholder alignment.

    Defaults that differ from ``trl.DPOConfig``: ``max_length=2048``. ``ld_alpha`` and ``use_weighting`` (WPO) need
    per-token probabilities of a single stream and are not supported (they raise).
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["task_weights", "task_speech_logp_weights"]

    max_length: int | None = field(
        default=2048,
        metadata={"help": "Longest chosen/rejected sequence; longer examples raise (never truncated)."},
    )
    speech_logp_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the SRH speech log-prob in an answer's log-prob (text + w * speech)."},
    )
    task_speech_logp_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "speech_logp_weight per task label, e.g. {'text_preference': 0.0}."},
    )
    task_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Loss weight per task label, e.g. {'empathy': 2.0, 'robustness': 1.0}."},
    )
    default_task_weight: float = field(
        default=1.0, metadata={"help": "Weight of tasks not in task_weights and of rows without a task."}
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": "Task names known in advance (needed for streaming datasets)."}
    )
    speech_delay_tokens: int = field(
        default=10, metadata={"help": "Speech-BOS codes in front of every spoken answer (official data: 10)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.task_weights, str):
            import json

            self.task_weights = json.loads(self.task_weights)
        self.task_weights = {str(k): float(v) for k, v in (self.task_weights or {}).items()} or None
        if isinstance(self.task_speech_logp_weights, str):
            import json

            self.task_speech_logp_weights = json.loads(self.task_speech_logp_weights)
        self.task_speech_logp_weights = {
            str(k): float(v) for k, v in (self.task_speech_logp_weights or {}).items()
        } or None
        for name, value in (self.task_speech_logp_weights or {}).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"speech_logp_weight of task {name!r} must be a finite number >= 0, got {value}.")
        for name, value in {**(self.task_weights or {}), "default_task_weight": self.default_task_weight}.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"task weight {name!r} must be a finite number >= 0, got {value}.")
        if not math.isfinite(self.speech_logp_weight) or self.speech_logp_weight < 0:
            raise ValueError(f"speech_logp_weight must be a finite number >= 0, got {self.speech_logp_weight}.")
        unknown = [t for t in self.loss_type if t not in LOG_PROB_LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}; choose from {LOG_PROB_LOSS_TYPES}.")
        if self.ld_alpha is not None:
            raise NotImplementedError(
                "ld_alpha (LD-DPO) weights the tokens of one stream past the shared length; it is not defined for "
                "answers scored over a text and a speech stream. Leave ld_alpha=None."
            )
        if self.use_weighting:
            raise NotImplementedError(
                "use_weighting (WPO) needs per-token probabilities of one output head; it is not supported for "
                "text + speech answers. Leave use_weighting=False."
            )
        if self.task_weights and any(t in SORTING_LOSS_TYPES for t in self.loss_type):
            weights = {*self.task_weights.values(), self.default_task_weight}
            if weights != {1.0}:
                raise ValueError(
                    f"loss types {SORTING_LOSS_TYPES} sort the batch, so a pair's loss cannot carry its task weight; "
                    "use task_weights only with the other loss types."
                )

    def task_speech_logp_weight(self, task: str | None) -> float:
        """The speech-stream weight of a task's answers."""
        if task is None:
            return self.speech_logp_weight
        return (self.task_speech_logp_weights or {}).get(task, self.speech_logp_weight)

    def task_weight(self, task: str | None) -> float:
        if task is None:
            return self.default_task_weight
        return (self.task_weights or {}).get(task, self.default_task_weight)


# -------------------------------------------------------------------------------------------------------- trainer
@contextlib.contextmanager
def _checkpointing_disabled(model: nn.Module, kwargs: dict | None):
    """Turn activation (gradient) checkpointing off for a no-grad reference pass, then restore it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names
        flag, off, on = (
            "is_activation_checkpointing",
            "activation_checkpointing_disable",
            "activation_checkpointing_enable",
        )
    else:
        flag, off, on = "is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"
    enabled = bool(getattr(model, flag, False))
    if enabled:
        getattr(model, off)()
    try:
        yield
    finally:
        if enabled:
            getattr(model, on)(kwargs)


def _base_model(model: nn.Module) -> nn.Module:
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def install_sequence_log_probs_forward(model: nn.Module) -> None:
    """Make sure ``model(..., return_sequence_log_probs=True)`` reaches the model's own forward.

    The scoring runs through ``forward`` (natively supported by the model) because DDP synchronises gradients only
    for computations that go through the wrapped module's ``forward``. TRL installs an instance-level ``forward``
    (a fused LM head that closes over the original forward and breaks deep copies); it is removed here, since
    this trainer never uses it.
    """
    base = _base_model(model)
    if not hasattr(base, "sequence_log_probs"):
        raise TypeError(
            f"{type(base).__name__} has no sequence_log_probs(); FunAudioChatDPOTrainer trains "
            "FunAudioChatForConditionalGeneration models (optionally wrapped by PEFT)."
        )
    base.__dict__.pop("forward", None)


class FunAudioChatDPOTrainer(DPOTrainer):
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

    _tag_names = ["trl", "dpo", "fun-audio-chat"]

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

        install_sequence_log_probs_forward(model)
        if ref_model is not None:
            if ref_model is model:
                raise ValueError("model and ref_model must be different objects (omit ref_model for a frozen copy).")
            install_sequence_log_probs_forward(ref_model)
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
        # TRL patched a fused LM head over our forward (it closes over the original forward, so a deep copy would run
        # the wrong model); the DPO scoring here never uses it.
        install_sequence_log_probs_forward(self.model)
        if self.ref_model is not None:
            install_sequence_log_probs_forward(self.accelerator.unwrap_model(self.ref_model))

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

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Rows are built by the collator (on the fly) or ahead of time by ``prepare_preference_dataset``."""
        first = next(iter(dataset))
        if "chosen_input_ids" not in first and not {"prompt", "chosen", "rejected"} <= set(first):
            raise ValueError(
                f"The {dataset_name} dataset must hold preference rows with 'prompt', 'chosen' and 'rejected' (see "
                f"docs/dpo.md) or rows built by prepare_preference_dataset; got columns {sorted(first)}."
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(dict.fromkeys(RAW_COLUMNS + BUILT_COLUMNS + REF_COLUMNS))

    # ---------------------------------------------------------------------------------------- log-probs
    @staticmethod
    def _model_inputs(inputs: Mapping) -> dict[str, torch.Tensor]:
        return {k: inputs[k] for k in MODEL_INPUT_KEYS if inputs.get(k) is not None}

    def stream_log_probs(self, model: nn.Module, inputs: Mapping) -> dict[str, torch.Tensor]:
        """Per-row ``{"text", "speech", "text_tokens", "speech_tokens"}`` of a collated batch (2B rows)."""
        return model(**self._model_inputs(inputs), **{_FORWARD_FLAG: True})

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
        both = torch.stack([streams["text"], streams["speech"]], dim=-1).float()
        return both.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
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
        dataset = dataset.add_column("ref_chosen_logps", values[:, :2].tolist())
        dataset = dataset.add_column("ref_rejected_logps", values[:, 2:].tolist())
        logger.info("precomputed reference log-probs for %d %s pairs", len(dataset), name)
        return dataset

    def _pair_weights(self, inputs: Mapping, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        task_ids = inputs.get("task_ids")
        if task_ids is None:
            task_ids = torch.full((batch,), -1, dtype=torch.long, device=device)
        table = self._task_weight_table.to(device)
        default = torch.full((batch,), self.args.default_task_weight, device=device)
        weights = torch.where(task_ids >= 0, table[task_ids.clamp(min=0)] if len(table) else default, default)
        return task_ids, weights

    # -------------------------------------------------------------------------------------------- loss
    def speech_weights(self, inputs: Mapping, batch: int, device) -> torch.Tensor:
        """(B,) speech-stream weight of each pair: its task's ``task_speech_logp_weights`` entry, else
        ``speech_logp_weight``."""
        task_ids = inputs.get("task_ids")
        default = torch.full((batch,), self.speech_logp_weight, device=device)
        if task_ids is None or not len(self._task_speech_weight_table):
            return default
        table = self._task_speech_weight_table.to(device)
        return torch.where(task_ids >= 0, table[task_ids.clamp(min=0)], default)

    def _answers(self, streams: Mapping[str, torch.Tensor], inputs: Mapping | None = None) -> dict[str, torch.Tensor]:
        """Split 2B-row stream log-probs into chosen/rejected and combine ``text + w * speech`` with each pair's
        speech weight ``w``."""
        out: dict[str, torch.Tensor] = {}
        for key in ("text", "speech"):
            out[f"chosen_{key}"], out[f"rejected_{key}"] = streams[key].chunk(2)
        w = self.speech_weights(inputs or {}, out["chosen_text"].shape[0], out["chosen_text"].device)
        w = w.to(out["chosen_text"].dtype)
        out["speech_weights"] = w
        for side in ("chosen", "rejected"):
            out[side] = out[f"{side}_text"] + w * out[f"{side}_speech"]
        if "text_tokens" in streams:
            scored = (w != 0).repeat(2).to(streams["speech_tokens"].dtype)
            tokens = streams["text_tokens"] + streams["speech_tokens"] * scored
            out["chosen_tokens"], out["rejected_tokens"] = tokens.chunk(2)
        return out

    def answer_log_probs(self, model: nn.Module, inputs: Mapping) -> dict[str, torch.Tensor]:
        """Log-probs of the chosen and rejected answers of a collated batch, each (B,): ``chosen``/``rejected``
        (= ``text + w * speech`` with the pair's task speech weight ``w``), their ``_text``/``_speech`` parts,
        ``_tokens`` (scored tokens: text, plus speech unless ``w == 0``) and ``speech_weights``."""
        return self._answers(self.stream_log_probs(model, inputs), inputs)

    def reference_answer_log_probs(self, inputs: Mapping) -> dict[str, torch.Tensor]:
        """The reference's :meth:`answer_log_probs` (from the batch's precomputed columns when present)."""
        if "ref_chosen_logps" in inputs:
            both = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
            return self._answers({"text": both[:, 0], "speech": both[:, 1]}, inputs)
        return self._answers(self.reference_stream_log_probs(inputs), inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        policy = self.answer_log_probs(model, inputs)
        ref = {k: v.to(policy["chosen"]) for k, v in self.reference_answer_log_probs(inputs).items()}
        w = policy["speech_weights"]
        chosen_logps, rejected_logps = policy["chosen"], policy["rejected"]
        chosen_text, rejected_text = policy["chosen_text"], policy["rejected_text"]
        chosen_speech, rejected_speech = policy["chosen_speech"], policy["rejected_speech"]
        chosen_lengths, rejected_lengths = policy["chosen_tokens"], policy["rejected_tokens"]
        ref_chosen_logps, ref_rejected_logps = ref["chosen"], ref["rejected"]
        ref_chosen_text, ref_rejected_text = ref["chosen_text"], ref["rejected_text"]
        ref_chosen_speech, ref_rejected_speech = ref["chosen_speech"], ref["rejected_speech"]

        batch = chosen_logps.shape[0]
        task_ids, weights = self._pair_weights(inputs, batch, chosen_logps.device)
        per_pair = torch.zeros_like(chosen_logps)
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_pair = per_pair + loss_weight * preference_loss(
                loss_type,
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                discopop_tau=self.args.discopop_tau,
                f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
        loss = (weights.to(per_pair.dtype) * per_pair).mean()

        # ---- metrics (TRL names + stream split + per task)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        text_margins = self.beta * ((chosen_text - ref_chosen_text) - (rejected_text - ref_rejected_text)).detach()
        speech_margins = (
            self.beta * w * ((chosen_speech - ref_chosen_speech) - (rejected_speech - ref_rejected_speech)).detach()
        )
        per_pair_values = torch.stack(
            [
                chosen_rewards,
                rejected_rewards,
                chosen_rewards - rejected_rewards,
                (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
                text_margins,
                speech_margins,
                chosen_logps.detach(),
                rejected_logps.detach(),
                chosen_text.detach(),
                chosen_speech.detach(),
                rejected_text.detach(),
                rejected_speech.detach(),
                per_pair.detach(),
                task_ids.to(chosen_rewards.dtype),
            ],
            dim=-1,
        ).float()
        gathered = self.accelerator.gather_for_metrics(per_pair_values)
        means = gathered.mean(0).tolist()
        names = (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "rewards/text_margins",
            "rewards/speech_margins",
            "logps/chosen",
            "logps/rejected",
            "logps/chosen_text",
            "logps/chosen_speech",
            "logps/rejected_text",
            "logps/rejected_speech",
        )
        for name, value in zip(names, means):
            self._metrics[mode][name].append(value)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._accumulate_task_stats(mode, gathered)

        if return_outputs:
            return loss, {"logits": torch.stack([chosen_rewards, rejected_rewards], dim=-1)}
        return loss

    # ------------------------------------------------------------------------------------------- metrics
    _TASK_FIELDS = ("chosen", "rejected", "margins", "accuracies")

    def _accumulate_task_stats(self, mode: str, gathered: torch.Tensor) -> None:
        if not self.task_names:
            return
        task_ids = gathered[:, -1].long()
        keep = task_ids >= 0
        columns = torch.cat([torch.ones_like(gathered[:, :1]), gathered[:, :4], gathered[:, 12:13]], dim=-1)
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
            for column, field_name in enumerate(self._TASK_FIELDS, start=1):
                metrics[f"rewards/{task}/{field_name}"] = float(stats[index, column]) / count
            if not sorting:
                metrics[f"loss/{task}"] = float(stats[index, 5]) / count
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in self._task_metrics(mode).items():
            self._metrics[mode][key] = [value]
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        """Evaluation step. For ``compute_metrics``, ``EvalPrediction.predictions`` are the (N, 2) ``[chosen, rejected]``
        rewards and ``label_ids`` the (N,) task indices into ``trainer.task_names`` (-1: no task)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self._compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rewards = outputs["logits"]
        task_ids = inputs.get("task_ids")
        if task_ids is None:
            task_ids = torch.full((rewards.shape[0],), -1, dtype=torch.long, device=rewards.device)
        return loss.detach(), rewards, task_ids

    def _get_num_items_in_batch(self, batch_samples, device):
        return None  # the DPO loss is a mean over pairs; nothing to count


__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOG_PROB_LOSS_TYPES",
    "FunAudioChatDPOConfig",
    "FunAudioChatDPOTrainer",
    "f_divergence_scores",
    "install_sequence_log_probs_forward",
    "preference_loss",
]
