"""How the Speech Refined Head picks each 25 Hz code: the speech sampling settings and the two selection rules.

* :func:`select_code` is the default decoding path's rule: transformers' own logits warpers and
  ``torch.multinomial`` on the global random stream, so a seeded call draws what ``torch.manual_seed`` promises and
  the serving decoder can swap a row's random state in around it.
* :func:`select_code_on_device` is the compiled path's rule: the same temperature / top-k / top-p / repetition
  penalty written as plain tensor arithmetic (no Python-side branching on values, no host sync), and sampling by
  inverting the cumulative distribution at a uniform draw the caller makes before entering the compiled region.
  That keeps the whole speech group inside one ``torch.compile(fullgraph=True)`` graph while a seeded generator
  still reproduces the codes.

Greedy selection (``do_sample=False``) is ``argmax`` in both rules, so both paths pick the same greedy codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SpeechSamplingSettings:
    """The speech-code controls of one generate() call (``speech_*`` fields of the generation config)."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> SpeechSamplingSettings:
        return cls(
            do_sample=bool(config.speech_do_sample),
            temperature=config.speech_temperature,
            top_p=config.speech_top_p,
            top_k=config.speech_top_k,
            repetition_penalty=config.speech_repetition_penalty,
        )

    @property
    def penalised(self) -> bool:
        """Whether the repetition penalty changes anything (1.0 and None leave the logits as they are)."""
        return self.repetition_penalty not in (None, 1.0)

    def validate(self) -> None:
        """Refuse values the speech sampler cannot use, naming the fix (as transformers does for text)."""
        penalty = self.repetition_penalty
        if penalty is not None and (not isinstance(penalty, (int, float)) or penalty <= 0):
            raise ValueError(
                f"speech_repetition_penalty has to be a strictly positive float (1.0 = no penalty), got {penalty!r}."
            )
        if not self.do_sample:
            return
        temperature = self.temperature
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature <= 0):
            raise ValueError(
                f"speech_temperature={temperature!r} cannot be used for sampling speech codes: it must be a strictly "
                "positive float. For greedy (deterministic) speech codes pass speech_do_sample=False."
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"speech_top_p must be in (0, 1], got {self.top_p!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"speech_top_k must be a non-negative integer (0 = off), got {self.top_k!r}.")

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings (the default path's sampling)."""
        processors = LogitsProcessorList()
        if not self.do_sample:
            return processors
        if self.temperature is not None and self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        return processors


# Greedy codes, no penalty: what the "consistent" training recipe decodes with.
GREEDY_SPEECH = SpeechSamplingSettings(do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


def penalise_repeated_codes(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` rule over a per-row set of codes (B, V) bool, so rows with
    different histories (or none) in one batch never see each other's codes."""
    if seen is None:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def select_code(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    settings: SpeechSamplingSettings,
    warpers: LogitsProcessorList,
) -> torch.Tensor:
    """(B, V) logits -> (B,) codes, the default path's rule (``warpers`` are ``settings.warpers()``)."""
    logits = penalise_repeated_codes(logits, seen, settings.repetition_penalty)
    if settings.do_sample:
        scores = logits
        # Each warper is called directly: LogitsProcessorList.__call__ inspects every processor's signature on every
        # call, which cost about a tenth of a small model's decode step at 5 sub-steps per step.
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(logits, dim=-1)


def warp_logits(logits: torch.Tensor, settings: SpeechSamplingSettings) -> torch.Tensor:
    """Temperature, top-k and top-p as transformers' warpers apply them (min_tokens_to_keep=1), as tensor ops."""
    scores = logits
    if settings.temperature is not None and settings.temperature != 1.0:
        scores = scores / settings.temperature
    if settings.top_k:
        top_k = min(settings.top_k, scores.shape[-1])
        threshold = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - settings.top_p)
        drop_sorted[..., -1:] = False  # the most likely code always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -float("inf"))
    return scores


def select_code_on_device(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    settings: SpeechSamplingSettings,
    uniform: torch.Tensor | None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) codes without leaving the device; ``uniform`` (B,) in [0, 1) when sampling.

    Sampling inverts the cumulative distribution: the code is the first whose cumulative probability exceeds
    ``uniform`` times the total, which draws each code with its probability (a zero-probability code is never
    first past the threshold, since the cumulative sum does not rise there).
    """
    if settings.penalised:
        logits = penalise_repeated_codes(logits, seen, settings.repetition_penalty)
    if not settings.do_sample:
        return torch.argmax(logits, dim=-1)
    probabilities = warp_logits(logits, settings).softmax(dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    threshold = uniform[:, None].to(cumulative.dtype) * cumulative[:, -1:]
    return (cumulative <= threshold).sum(dim=-1).clamp(max=logits.shape[-1] - 1)


__all__ = [
    "GREEDY_SPEECH",
    "SpeechSamplingSettings",
    "penalise_repeated_codes",
    "select_code",
    "select_code_on_device",
    "warp_logits",
]
