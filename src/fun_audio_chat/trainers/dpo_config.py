"""``FunAudioChatDPOConfig``: ``trl.DPOConfig`` plus the speech and multi-task settings of Fun-Audio-Chat DPO.

Split from the trainer as TRL splits ``DPOConfig`` from ``DPOTrainer`` (``docs/dpo.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from trl import DPOConfig

from ..framework_compat import dict_fields_parsed_from_json
from .dpo_losses import LOG_PROB_LOSS_TYPES, SORTING_LOSS_TYPES


@dict_fields_parsed_from_json("task_weights", "task_speech_logp_weights")
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
            self.task_weights = json.loads(self.task_weights)
        self.task_weights = {str(k): float(v) for k, v in (self.task_weights or {}).items()} or None
        if isinstance(self.task_speech_logp_weights, str):
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


__all__ = ["FunAudioChatDPOConfig"]
