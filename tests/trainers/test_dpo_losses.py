"""The DPO loss formulas (``fun_audio_chat.trainers.dpo_losses``) against frozen reference values.

As TRL's own invariant tests do, fixed small inputs are checked against numbers frozen once in
``tests/fixtures/dpo_losses.json``. They were computed independently, one number at a time with Python's ``math``
(``tests/fixtures/make_dpo_loss_fixture.py``), and compared with TRL's ``DPOTrainer`` loss of the release the module
follows when they were frozen. A changed formula, in ours or in a copy of TRL's, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fun_audio_chat.trainers.dpo_losses import (
    LOG_PROB_LOSS_TYPES,
    LOGGED_PAIR_METRICS,
    TRL_LOSS_FORMULAS_VERSION,
    answer_log_probs,
    f_divergence_scores,
    multi_task_preference_loss,
    pair_metrics,
    per_task_values,
    preference_loss,
)

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "dpo_losses.json").read_text())
CASES = FIXTURE["cases"]


def _case_id(case: dict) -> str:
    extras = [f"{k}={v}" for k, v in case.items() if k not in ("loss_types", "per_pair", "loss")]
    return "+".join(case["loss_types"]) + ("[" + ",".join(extras) + "]" if extras else "")


def _inputs() -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in FIXTURE["inputs"].items()}


def _tolerance(case: dict) -> dict[str, float]:
    # TRL computes the alpha-divergence in float32, and exo_pair's epsilon is a float32 tensor: those cases agree
    # with the double-precision reference to float32 precision only.
    if case.get("f_divergence_type") == "alpha_divergence" or "exo_pair" in case["loss_types"]:
        return {"rtol": 1e-5, "atol": 1e-8}
    return {"rtol": 1e-12, "atol": 1e-12}


def test_the_fixture_follows_the_same_trl_release_as_the_module():
    assert FIXTURE["trl_version"] == TRL_LOSS_FORMULAS_VERSION


def test_every_loss_type_has_frozen_values():
    covered = {t for case in CASES for t in case["loss_types"]}
    assert covered == set(LOG_PROB_LOSS_TYPES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_loss_equals_frozen_values(case):
    x = _inputs()
    hparams = {
        k: case[k]
        for k in ("beta", "label_smoothing", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef")
        if k in case
    }
    hparams.setdefault("beta", FIXTURE["beta"])
    weights = case.get("loss_weights", [1.0] * len(case["loss_types"]))
    per_pair = sum(
        weight
        * preference_loss(
            loss_type,
            x["chosen"],
            x["rejected"],
            x["ref_chosen"],
            x["ref_rejected"],
            chosen_lengths=x["chosen_lengths"],
            rejected_lengths=x["rejected_lengths"],
            **hparams,
        )
        for loss_type, weight in zip(case["loss_types"], weights, strict=True)
    )
    expected = torch.tensor(case["per_pair"], dtype=torch.float64)
    torch.testing.assert_close(per_pair.double(), expected, **_tolerance(case))
    torch.testing.assert_close(
        per_pair.double().mean(), torch.tensor(case["loss"], dtype=torch.float64), **_tolerance(case)
    )

    # the trainer's entry point gives the same batch loss (unit task weights, policy token counts as lengths)
    policy = {
        "chosen": x["chosen"],
        "rejected": x["rejected"],
        "chosen_tokens": x["chosen_lengths"],
        "rejected_tokens": x["rejected_lengths"],
    }
    reference = {"chosen": x["ref_chosen"], "rejected": x["ref_rejected"]}
    loss, pairs = multi_task_preference_loss(
        policy, reference, torch.ones(4), loss_types=case["loss_types"], loss_weights=weights, **hparams
    )
    torch.testing.assert_close(pairs, per_pair)
    torch.testing.assert_close(loss.double(), torch.tensor(case["loss"], dtype=torch.float64), **_tolerance(case))


def test_multi_task_text_and_speech_combination_equals_frozen_values():
    """Answers = text + (task's speech weight) x speech; loss = mean(task weight x pair loss); rewards and the margin's
    text and speech terms."""
    m, want = FIXTURE["multi_task"]["inputs"], FIXTURE["multi_task"]["expected"]

    def tensors(values):
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}

    task_ids = torch.tensor(m["task_ids"])
    speech_weights = per_task_values(
        task_ids, torch.tensor(m["speech_weights_by_task"], dtype=torch.float64), m["default_speech_weight"], 3
    )
    task_weights = per_task_values(
        task_ids, torch.tensor(m["task_weights_by_task"], dtype=torch.float64), m["default_task_weight"], 3
    )
    assert speech_weights.tolist() == want["speech_weights"] and task_weights.tolist() == want["task_weights"]

    policy = answer_log_probs(tensors(m["policy"]), speech_weights)
    reference = answer_log_probs(tensors(m["reference"]), speech_weights)
    for got, expected in ((policy, want["policy_answers"]), (reference, want["reference_answers"])):
        for key, values in expected.items():
            torch.testing.assert_close(got[key].double(), torch.tensor(values, dtype=torch.float64), msg=key)
    assert set(reference) == {f"{s}{p}" for s in ("chosen", "rejected") for p in ("", "_text", "_speech")} | {
        "speech_weights"
    }

    loss, per_pair = multi_task_preference_loss(policy, reference, task_weights, beta=m["beta"])
    torch.testing.assert_close(per_pair, torch.tensor(want["per_pair"], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, torch.tensor(want["loss"], dtype=torch.float64), rtol=1e-12, atol=1e-12)

    metrics = pair_metrics(policy, reference, m["beta"])
    assert set(metrics) == set(LOGGED_PAIR_METRICS)
    for name, values in want["metrics"].items():
        torch.testing.assert_close(metrics[name], torch.tensor(values, dtype=torch.float64), msg=name)
    torch.testing.assert_close(
        metrics["rewards/text_margins"] + metrics["rewards/speech_margins"], metrics["rewards/margins"]
    )


def test_per_task_values_without_tasks_use_the_default():
    table = torch.tensor([2.0, 3.0])
    assert per_task_values(None, table, 0.5, 3).tolist() == [0.5, 0.5, 0.5]
    assert per_task_values(torch.tensor([1, -1]), torch.zeros(0), 0.5, 2).tolist() == [0.5, 0.5]
    assert per_task_values(torch.tensor([1, -1, 0]), table, 0.5, 3).tolist() == [3.0, 0.5, 2.0]


def test_bad_arguments_raise_clear_errors():
    x = _inputs()
    args = (x["chosen"], x["rejected"], x["ref_chosen"], x["ref_rejected"])
    with pytest.raises(ValueError, match="Unknown loss type 'kto'"):
        preference_loss("kto", *args)
    for loss_type in ("ipo", "sft", "sigmoid_norm"):
        with pytest.raises(ValueError, match=f"loss type '{loss_type}' needs chosen_lengths"):
            preference_loss(loss_type, *args)
    with pytest.raises(ValueError, match="Unknown f_divergence_type 'hellinger'"):
        f_divergence_scores(x["chosen"], "hellinger")


# ------------------------------------------------------------------------------ against the installed TRL, publicly
@pytest.fixture(scope="module")
def text_dpo_setup():
    """A tiny text-only causal LM, a different reference, and three preference pairs, for ``trl.DPOTrainer``."""
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fun_audio_chat.tiny import tiny_processor

    tokenizer = tiny_processor().tokenizer

    def model(seed):
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=tokenizer.pad_token_id,
        )
        return Qwen3ForCausalLM(config)

    rows = [
        {"prompt": "hello there", "chosen": " abc def", "rejected": " xyz"},
        {"prompt": "q", "chosen": " yes indeed", "rejected": " no no no no"},
        {"prompt": "tell me", "chosen": " a", "rejected": " b c"},
    ]
    return tokenizer, model, Dataset.from_list(rows)


def _completion_log_probs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probs of the completion tokens, and their counts, from the model's plain logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    picked = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    return (picked * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_loss_equals_the_installed_trl_dpo_trainer(case, text_dpo_setup, tmp_path):
    """``trl.DPOTrainer.compute_loss`` (public) on a text-only model equals our formula on the same log-probs."""
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    tokenizer, model, dataset = text_dpo_setup
    hparams = {
        k: case[k]
        for k in ("beta", "label_smoothing", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef")
        if k in case
    }
    hparams.setdefault("beta", FIXTURE["beta"])
    weights = case.get("loss_weights", [1.0] * len(case["loss_types"]))
    checkpointing = "activation_checkpointing"
    if checkpointing not in TrainingArguments.__dataclass_fields__:
        checkpointing = "gradient_checkpointing"
    args = DPOConfig(
        str(tmp_path),
        loss_type=case["loss_types"],
        loss_weights=weights,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=3,
        bf16=False,
        **{checkpointing: False},  # TRL turns it on by default; its old name on older transformers 5.x
        **hparams,
    )
    trainer = DPOTrainer(model(0), ref_model=model(1), args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    logps, lengths = _completion_log_probs(trainer.model, batch)
    ref_logps, _ = _completion_log_probs(trainer.ref_model, batch)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    ours = sum(
        weight
        * preference_loss(
            loss_type,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **hparams,
        ).mean()
        for loss_type, weight in zip(case["loss_types"], weights, strict=True)
    )
    assert float(ours) == pytest.approx(float(theirs), rel=2e-5, abs=1e-6), (
        f"the installed TRL's DPO loss differs from the formulas of TRL {TRL_LOSS_FORMULAS_VERSION} that "
        "fun_audio_chat.trainers.dpo_losses follows"
    )
