"""The formulas of Fun-Audio-Chat DPO: pure functions of tensors, no trainer state.

**Which formulas.** Every preference loss here is one of ``trl.DPOTrainer``'s loss types as TRL
:data:`TRL_LOSS_FORMULAS_VERSION` defines them (its ``loss_type`` / ``loss_weights`` / ``f_divergence_type``
settings), computed from sequence log-probabilities: for the same log-probabilities the batch loss
``preference_loss(...).mean()`` equals TRL's. TRL's formulas have changed between releases; when moving to a new
TRL release, compare its ``DPOTrainer`` with this module and update :data:`TRL_LOSS_FORMULAS_VERSION` and the
frozen values in ``tests/fixtures/dpo_losses.json`` together (``tests/trainers/test_dpo_losses.py``).

**What is ours.** The multi-task, two-stream layer on top (``docs/dpo.md``):

* an answer's log-probability is ``text + w * speech`` with ``w`` the speech weight of the pair's task
  (:func:`answer_log_probs`);
* the batch loss is ``mean over pairs of task_weight * sum over loss types of loss_weight * pair loss``
  (:func:`multi_task_preference_loss`);
* metrics per pair with TRL's names plus the stream split (:func:`pair_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

#: The TRL release whose ``DPOTrainer`` loss formulas this module follows.
TRL_LOSS_FORMULAS_VERSION = "1.16.0"

#: TRL's loss types that need only sequence log-probabilities (and lengths): all of them, in the followed release.
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
#: The two streams of an answer, in the order of the ``[text, speech]`` pairs stored as reference log-probs.
STREAMS = ("text", "speech")


# ------------------------------------------------------------------------------------------- TRL's loss types
def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """f'(pi/pi_ref) of the f-DPO paper, as TRL computes it (``reverse_kl``: the log-ratio itself)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is reverse KL
            return logratios
        t = (alpha - 1.0) * logratios
        # TRL clamps in float32 so that exp() stays finite once cast back to a half type
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
    """Per-pair loss (B,) of one TRL loss type from sequence log-probabilities; TRL's batch loss is its mean.

    ``chosen_lengths`` / ``rejected_lengths`` (scored tokens per answer) are needed by the length-normalised losses
    ``ipo`` and ``sigmoid_norm`` and by ``sft``, whose per-pair values are scaled so that their mean is TRL's mean
    over all chosen tokens of the batch.
    """
    if loss_type not in LOG_PROB_LOSS_TYPES:
        raise ValueError(f"Unknown loss type {loss_type!r}; choose from {LOG_PROB_LOSS_TYPES}.")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores

    def lengths(value: torch.Tensor | None) -> torch.Tensor:
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
    if loss_type in SORTING_LOSS_TYPES:
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
        # TRL: minus the mean over all chosen tokens of the batch; per pair: -logp_i * B / total tokens.
        if chosen_lengths is None:
            lengths(None)
        total = chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1.0)
        return -chosen_logps * chosen_logps.shape[0] / total
    # sigmoid_norm
    normalised = chosen_scores / lengths(chosen_lengths) - rejected_scores / lengths(rejected_lengths)
    return -F.logsigmoid(beta * normalised)


# ------------------------------------------------------------------------------ multi-task, two streams (ours)
def per_task_values(task_ids: torch.Tensor | None, table: torch.Tensor, default: float, batch: int) -> torch.Tensor:
    """(B,) value of each pair's task: ``table[task_id]``, or ``default`` for task id -1 (no task) or no task ids."""
    device = table.device if task_ids is None else task_ids.device
    fallback = torch.full((batch,), float(default), dtype=table.dtype, device=device)
    if task_ids is None or not len(table):
        return fallback
    table = table.to(device)
    return torch.where(task_ids >= 0, table[task_ids.clamp(min=0)], fallback)


def answer_log_probs(streams: Mapping[str, torch.Tensor], speech_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Chosen and rejected answer log-probs, each (B,), from per-row stream log-probs of 2B rows (chosen first).

    ``streams`` holds ``text`` and ``speech`` (2B,) and optionally ``text_tokens`` / ``speech_tokens`` (scored
    targets per row). Returns ``chosen`` / ``rejected`` = ``text + w * speech`` with ``w = speech_weights`` (B,),
    their ``_text`` / ``_speech`` parts, ``speech_weights``, and with the token counts ``chosen_tokens`` /
    ``rejected_tokens`` (text targets, plus speech targets unless the pair's ``w`` is 0).
    """
    out: dict[str, torch.Tensor] = {}
    for stream in STREAMS:
        out[f"chosen_{stream}"], out[f"rejected_{stream}"] = streams[stream].chunk(2)
    weights = speech_weights.to(out["chosen_text"])
    out["speech_weights"] = weights
    for side in ("chosen", "rejected"):
        out[side] = out[f"{side}_text"] + weights * out[f"{side}_speech"]
    if "text_tokens" in streams:
        scored = (weights != 0).repeat(2).to(streams["speech_tokens"].dtype)
        tokens = streams["text_tokens"] + streams["speech_tokens"] * scored
        out["chosen_tokens"], out["rejected_tokens"] = tokens.chunk(2)
    return out


def multi_task_preference_loss(
    policy: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    task_weights: torch.Tensor,
    *,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    **hparams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per_pair)``: the batch loss ``mean(task_weights * per_pair)`` and the unweighted per-pair loss (B,).

    ``policy`` / ``reference``: :func:`answer_log_probs` of the two models (the token counts are read from
    ``policy``). ``per_pair`` is ``sum over loss types of loss_weight * preference_loss``; ``hparams`` go to
    :func:`preference_loss` (``beta``, ``label_smoothing``, ``discopop_tau``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``).
    """
    loss_weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    per_pair = torch.zeros_like(policy["chosen"])
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        per_pair = per_pair + loss_weight * preference_loss(
            loss_type,
            policy["chosen"],
            policy["rejected"],
            reference["chosen"],
            reference["rejected"],
            chosen_lengths=policy.get("chosen_tokens"),
            rejected_lengths=policy.get("rejected_tokens"),
            **hparams,
        )
    return (task_weights.to(per_pair) * per_pair).mean(), per_pair


#: Names of the per-pair metric columns of :func:`pair_metrics` that are logged as batch means.
LOGGED_PAIR_METRICS = (
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


def pair_metrics(
    policy: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], beta: float
) -> dict[str, torch.Tensor]:
    """Per-pair metrics (each (B,), detached), keyed by their logged names (:data:`LOGGED_PAIR_METRICS`).

    TRL's rewards (``beta * (logp - ref_logp)``), margins and accuracies, plus the margin's two terms:
    ``rewards/text_margins`` + ``rewards/speech_margins`` = ``rewards/margins`` (the speech term carries the pair's
    speech weight), and the answers' log-probs with their stream parts.
    """
    p = {k: v.detach() for k, v in policy.items()}
    r = {k: v.detach().to(p["chosen"]) for k, v in reference.items()}
    chosen_rewards = beta * (p["chosen"] - r["chosen"])
    rejected_rewards = beta * (p["rejected"] - r["rejected"])

    def stream_margin(stream: str) -> torch.Tensor:
        chosen = p[f"chosen_{stream}"] - r[f"chosen_{stream}"]
        rejected = p[f"rejected_{stream}"] - r[f"rejected_{stream}"]
        return beta * (chosen - rejected)

    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/text_margins": stream_margin("text"),
        "rewards/speech_margins": p["speech_weights"] * stream_margin("speech"),
        "logps/chosen": p["chosen"],
        "logps/rejected": p["rejected"],
        "logps/chosen_text": p["chosen_text"],
        "logps/chosen_speech": p["chosen_speech"],
        "logps/rejected_text": p["rejected_text"],
        "logps/rejected_speech": p["rejected_speech"],
    }


__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOGGED_PAIR_METRICS",
    "LOG_PROB_LOSS_TYPES",
    "SORTING_LOSS_TYPES",
    "STREAMS",
    "TRL_LOSS_FORMULAS_VERSION",
    "answer_log_probs",
    "f_divergence_scores",
    "multi_task_preference_loss",
    "pair_metrics",
    "per_task_values",
    "preference_loss",
]
