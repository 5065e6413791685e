"""FunAudioChatDPOTrainer: answer log-probs over text + speech, loss types, task weights, references, LoRA, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..markers import two_processes
from .dpo_helpers import (
    independent_stream_log_probs,
    make_trainer,
    noise,
    pair_row,
    permute_within_groups,
    perturbed_copy,
    spoken,
    synthetic_rows,
    text_answer,
    tiny_model,
    user,
)

LORA_REGEX = r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def processor():
    from fun_audio_chat.tiny import tiny_processor

    return tiny_processor()


def _collate(trainer, rows):
    return trainer.data_collator(rows)


def _mixed_rows():
    """Pairs with user audio + text, text only, a text-only rejected answer, and answers of different lengths."""
    return [
        pair_row(
            user("hi there", noise(12000, seed=1)), spoken("abc", range(17)), spoken("xyzw", range(30, 53)), "empathy"
        ),
        pair_row(user("hello"), spoken("ab", range(5, 25)), text_answer("plain text reply"), "robustness"),
        pair_row(
            user("what is it", noise(9000, seed=2)),
            spoken("defg", range(40, 63)),
            spoken("defg", range(60, 83)),
            "audio_understanding",
        ),
    ]


# ------------------------------------------------------------------------------------------------- data format
def test_collator_stacks_chosen_then_rejected_with_tasks_and_shared_prompt(processor, tmp_path):
    from fun_audio_chat.trainers.preference_data import FunAudioChatPreferenceCollator, build_preference_example

    rows = _mixed_rows()
    collator = FunAudioChatPreferenceCollator(processor, task_names=["robustness", "empathy", "audio_understanding"])
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 6
    assert batch["task_ids"].tolist() == [1, 0, 2]
    # audio rows: 2 user audios per side + 3 chosen replies + 2 spoken rejected replies; features for user audio
    assert batch["speech_ids"].shape[0] == 9 and batch["input_features"].shape[0] == 4
    assert batch["feature_exist_mask"].tolist() == [True, False, False, True, False] + [True, False, True, False]
    for b in range(3):
        chosen, rejected = batch["labels"][b], batch["labels"][3 + b]
        prompt = int((chosen == -100).logical_and(batch["attention_mask"][b] == 1).sum())
        assert prompt == int((rejected == -100).logical_and(batch["attention_mask"][3 + b] == 1).sum())
        assert torch.equal(batch["input_ids"][b, :prompt], batch["input_ids"][3 + b, :prompt])
    # prepared rows (e.g. from prepare_preference_dataset) collate to the same batch; ref columns are carried
    built = [
        {**build_preference_example(processor, r), "ref_chosen_logps": [-1.0, -2.0], "ref_rejected_logps": -3.0}
        for r in rows
    ]
    again = collator(built)
    for key, value in batch.items():
        assert torch.equal(again[key], value), key
    assert again["ref_chosen_logps"].tolist() == [[-1.0, -2.0]] * 3
    assert again["ref_rejected_logps"].tolist() == [[-3.0, 0.0]] * 3
    with pytest.raises(ValueError, match="not in the trainer's task list"):
        FunAudioChatPreferenceCollator(processor, task_names=["empathy"])(rows)


def test_prepare_preference_dataset_and_shorthand_answers(processor):
    from datasets import Dataset

    from fun_audio_chat.trainers.preference_data import FunAudioChatPreferenceCollator, prepare_preference_dataset

    rows = [
        {
            "prompt": "say hi",
            "chosen": {"text": "hi", "speech_codes": list(range(12))},
            "rejected": {"text": "no"},
            "system": "You are asked to generate both text and speech tokens at the same time.",
            "task": "empathy",
        },
        {
            "prompt": "say hi",
            "chosen": {"text": "hi", "speech_codes": list(range(12))},
            "rejected": {"text": "go away " * 40},
            "task": "empathy",
            "system": "You are asked to generate both text and speech tokens at the same time.",
        },
    ]
    prepared = prepare_preference_dataset(Dataset.from_list(rows), processor, max_length=60)
    assert len(prepared) == 1  # the second pair's rejected side is longer than max_length: dropped
    collator = FunAudioChatPreferenceCollator(processor, task_names=["empathy"])
    assert all(torch.equal(a, b) for a, b in zip(collator([prepared[0]]).values(), collator(rows[:1]).values()))
    with pytest.raises(ValueError, match="max_length"):
        FunAudioChatPreferenceCollator(processor, max_length=60)(rows[1:])
    # the same answer spelled as a string, a message, a one-message list
    spellings = [
        "no",
        {"role": "assistant", "content": "no"},
        [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
    ]
    batches = [collator([dict(rows[0], rejected=s)]) for s in spellings]
    assert all(torch.equal(b[k], batches[0][k]) for b in batches for k in batches[0])
    assert torch.equal(batches[0]["input_ids"], collator(rows[:1])["input_ids"])
    # answers given as audio clips go through the speech tokenizer (S3SpeechTokenizer in real use)
    calls = []

    def fake_s3(waveforms):
        calls.append([len(w) for w in waveforms])
        return [list(range(12)) for _ in waveforms]

    spoken_audio = dict(rows[0], chosen={"text": "hi", "audio": noise(8000, seed=4), "sampling_rate": 16000})
    with pytest.raises(ValueError, match="speech_tokenizer"):
        collator([spoken_audio])
    tokenized = FunAudioChatPreferenceCollator(processor, task_names=["empathy"], speech_tokenizer=fake_s3)(
        [spoken_audio]
    )
    assert calls == [[8000]]
    assert all(torch.equal(tokenized[k], batches[0][k]) for k in batches[0])


# --------------------------------------------------------------------------------------- log-probs are correct
def test_answer_log_probs_equal_independent_forward_computation(processor, tmp_path):
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=3)
    trainer = make_trainer(model, _mixed_rows(), processor, tmp_path, ref_model=ref, speech_logp_weight=0.7)
    batch = _collate(trainer, _mixed_rows())
    model.eval()
    with torch.no_grad():
        ours = trainer.answer_log_probs(trainer.model, batch)
        theirs = independent_stream_log_probs(model, batch)
        ref_theirs = independent_stream_log_probs(ref, batch)
    for side, rows in (("chosen", slice(0, 3)), ("rejected", slice(3, 6))):
        torch.testing.assert_close(ours[f"{side}_text"].double(), theirs["text"][rows], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours[f"{side}_speech"].double(), theirs["speech"][rows], rtol=1e-5, atol=1e-4)
        combined = theirs["text"][rows] + 0.7 * theirs["speech"][rows]
        torch.testing.assert_close(ours[side].double(), combined, rtol=1e-5, atol=1e-4)
    assert float(ours["rejected_speech"][1]) == 0.0  # the text-only rejected answer has no speech stream
    assert (theirs["speech"][:3] < -50).all()

    # and the DPO loss is the sigmoid loss of exactly these numbers
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    logp = theirs["text"] + 0.7 * theirs["speech"]
    ref_logp = ref_theirs["text"] + 0.7 * ref_theirs["speech"]
    delta = (logp[:3] - ref_logp[:3]) - (logp[3:] - ref_logp[3:])
    expected = -torch.nn.functional.logsigmoid(0.1 * delta).mean()
    assert abs(float(loss) - float(expected)) < 1e-5


def _srh_only_params(model):
    """SRH parameters that only the speech stream uses (its output head is tied to the input speech embedding)."""
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith("audio_invert_tower.") and not n.startswith("audio_invert_tower.lm_head")
    }


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in trainer.model.named_parameters()
    }
    trainer.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_speech_logp_weight_zero_ignores_the_speech_stream(processor, tmp_path):
    codes = list(range(40, 60))
    rejected_codes = list(range(100, 120))
    rows = [pair_row(user("hello"), spoken("abcd", codes), spoken("wxyz", rejected_codes), "empathy")]
    # same rejected answer with the codes of every 5-code group reversed: identical LLM inputs, other SRH targets
    shuffled = [
        pair_row(user("hello"), spoken("abcd", codes), spoken("wxyz", permute_within_groups(rejected_codes)), "empathy")
    ]
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=2)
    losses = {}
    for weight in (0.0, 1.0):
        trainer = make_trainer(model, rows, processor, tmp_path / str(weight), ref_model=ref, speech_logp_weight=weight)
        base_loss, grads = _loss_and_grads(trainer, _collate(trainer, rows))
        other_loss, _ = _loss_and_grads(trainer, _collate(trainer, shuffled))
        losses[weight] = (base_loss, other_loss)
        srh = sum(float(grads[n].abs().sum()) for n in _srh_only_params(model))
        if weight == 0.0:
            assert srh == 0.0
        else:
            assert srh > 1e-4
    assert abs(losses[0.0][0] - losses[0.0][1]) < 1e-6  # speech stream changed, loss did not
    assert abs(losses[1.0][0] - losses[1.0][1]) > 1e-3  # ... unless the speech stream is weighted


def test_identical_text_only_speech_drives_the_loss(processor, tmp_path):
    codes = list(range(40, 60))
    rows = [pair_row(user("hello"), spoken("abcd", codes), spoken("abcd", permute_within_groups(codes)), "empathy")]
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=2)
    trainer = make_trainer(model, rows, processor, tmp_path / "w1", ref_model=ref, speech_logp_weight=1.0)
    batch = _collate(trainer, rows)
    with torch.no_grad():
        policy = trainer.answer_log_probs(trainer.model, batch)
        reference = trainer.reference_answer_log_probs(batch)
    # same words and same LLM inputs: the text stream scores both answers the same
    assert abs(float(policy["chosen_text"] - policy["rejected_text"])) < 1e-4
    assert abs(float(reference["chosen_text"] - reference["rejected_text"])) < 1e-4
    assert abs(float(policy["chosen_speech"] - policy["rejected_speech"])) > 1e-2
    loss, grads = _loss_and_grads(trainer, batch)
    assert abs(loss - math.log(2)) > 1e-4
    assert sum(float(grads[n].abs().sum()) for n in _srh_only_params(model)) > 1e-4

    # text-only contribution: zero
    text_only = make_trainer(model, rows, processor, tmp_path / "w0", ref_model=ref, speech_logp_weight=0.0)
    loss, grads = _loss_and_grads(text_only, batch)
    assert abs(loss - math.log(2)) < 1e-5
    assert max(float(g.abs().max()) for g in grads.values()) < 1e-5


def test_per_task_speech_logp_weight(processor, tmp_path):
    """A text-preference task scores text only, the others keep the global speech weight."""
    rows = synthetic_rows(1, seed=5)  # tasks text, speech, both
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=2)
    trainer = make_trainer(
        model, rows, processor, tmp_path, ref_model=ref, speech_logp_weight=0.5, task_speech_logp_weights={"text": 0.0}
    )
    batch = _collate(trainer, rows)
    with torch.no_grad():
        policy = trainer.answer_log_probs(trainer.model, batch)
    tasks = [trainer.task_names[i] for i in batch["task_ids"].tolist()]
    for row, task in enumerate(tasks):
        weight = 0.0 if task == "text" else 0.5
        for side in ("chosen", "rejected"):
            expected = policy[f"{side}_text"][row] + weight * policy[f"{side}_speech"][row]
            assert abs(float(policy[side][row] - expected)) < 1e-5
    text_row = tasks.index("text")
    assert float(policy["chosen_speech"][text_row]) != 0.0  # the speech stream is there, just not scored
    # only the text-task pair: the SRH-only parameters get no gradient
    _, grads = _loss_and_grads(trainer, _collate(trainer, [rows[text_row]]))
    assert sum(float(grads[n].abs().sum()) for n in _srh_only_params(model)) == 0.0
    with pytest.raises(ValueError, match="task 'text'"):
        make_trainer(model, rows, processor, tmp_path / "bad", ref_model=ref, task_speech_logp_weights={"text": -1})


def test_task_with_weight_zero_contributes_no_gradient(processor, tmp_path):
    rows = synthetic_rows(1, seed=5)  # tasks text, speech, both
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=2)
    trainer = make_trainer(model, rows, processor, tmp_path, ref_model=ref, task_weights={"speech": 0.0, "both": 2.0})
    assert trainer.task_names == ["both", "speech", "text"]
    only_muted = [rows[1]]
    loss, grads = _loss_and_grads(trainer, _collate(trainer, only_muted))
    assert loss == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())

    # swapping the muted pair's chosen and rejected answers changes nothing
    swapped = dict(rows[1], chosen=rows[1]["rejected"], rejected=rows[1]["chosen"])
    loss_a, grads_a = _loss_and_grads(trainer, _collate(trainer, rows))
    loss_b, grads_b = _loss_and_grads(trainer, _collate(trainer, [rows[0], swapped, rows[2]]))
    assert abs(loss_a - loss_b) < 1e-6
    assert max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a) < 1e-6
    # and the weighted loss is mean(weight * pair loss)
    with torch.no_grad():
        policy = trainer.answer_log_probs(trainer.model, _collate(trainer, rows))
        reference = trainer.reference_answer_log_probs(_collate(trainer, rows))
    margins = (policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"])
    pair_losses = -torch.nn.functional.logsigmoid(0.1 * margins)
    expected = (1.0 * pair_losses[0] + 0.0 * pair_losses[1] + 2.0 * pair_losses[2]) / 3
    assert abs(loss_a - float(expected)) < 1e-5


# ------------------------------------------------------------------------------------- loss types in the trainer
# (the formulas themselves: test_dpo_losses.py, against frozen values)
@pytest.mark.parametrize("loss_type", ["ipo", "sft", "sigmoid_norm"])
def test_trainer_loss_types_use_scored_token_counts(processor, tmp_path, loss_type):
    from fun_audio_chat.trainers.dpo import preference_loss

    rows = _mixed_rows()
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=3)
    trainer = make_trainer(model, rows, processor, tmp_path, ref_model=ref, loss_type=[loss_type])
    batch = _collate(trainer, rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        p, r = trainer.answer_log_probs(trainer.model, batch), trainer.reference_answer_log_probs(batch)
        seq = model.sequence_log_probs(**batch)
    tokens = seq["text_tokens"] + seq["speech_tokens"]
    assert torch.equal(torch.cat([p["chosen_tokens"], p["rejected_tokens"]]), tokens)
    expected = preference_loss(
        loss_type,
        p["chosen"],
        p["rejected"],
        r["chosen"],
        r["rejected"],
        beta=0.1,
        chosen_lengths=tokens[:3],
        rejected_lengths=tokens[3:],
    ).mean()
    assert abs(float(loss) - float(expected)) < 1e-6


def test_unsupported_options_raise(tmp_path):
    from .dpo_helpers import dpo_config

    with pytest.raises(NotImplementedError, match="ld_alpha"):
        dpo_config(tmp_path, ld_alpha=0.5)
    with pytest.raises(NotImplementedError, match="use_weighting"):
        dpo_config(tmp_path, use_weighting=True)
    with pytest.raises(ValueError, match="task weight"):
        dpo_config(tmp_path, task_weights={"empathy": -1.0})
    with pytest.raises(ValueError, match="sort the batch"):
        dpo_config(tmp_path, loss_type=["aot"], task_weights={"empathy": 2.0})
    with pytest.raises(ValueError, match="Unknown loss_type"):
        dpo_config(tmp_path, loss_type=["kto"])


# ------------------------------------------------------------------------------------------------ learning
def test_short_dpo_run_raises_heldout_margin_and_accuracy(processor, tmp_path):
    train_rows, heldout = synthetic_rows(6, seed=0), synthetic_rows(2, seed=100)  # 18 train pairs, 6 held out
    model = tiny_model(0)
    trainer = make_trainer(
        model,
        train_rows,
        processor,
        tmp_path,
        eval_rows=heldout,
        max_steps=18,
        per_device_train_batch_size=6,
        learning_rate=3e-3,
        beta=0.5,
        logging_steps=6,
        tasks=["text", "speech", "both"],
        activation_checkpointing=True,  # TRL's default (gradient checkpointing); the scoring path runs under it
    )
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == 0.0 and before["eval_rewards/accuracies"] == 0.0
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > 1.0
    assert after["eval_rewards/accuracies"] == 1.0
    for task in ("text", "speech", "both"):  # pairs differing in text only, in speech only, in both
        assert before[f"eval_rewards/{task}/margins"] == 0.0
        assert after[f"eval_rewards/{task}/margins"] > 0.5
        assert after[f"eval_rewards/{task}/accuracies"] == 1.0
    assert after["eval_rewards/speech_margins"] > 0.1  # the SRH term itself learned the preference
    parts = after["eval_rewards/text_margins"] + after["eval_rewards/speech_margins"]
    assert parts == pytest.approx(after["eval_rewards/margins"], abs=1e-4)
    # per-task metrics reach the training logs too
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(f"rewards/{t}/margins" in logged[-1] for t in ("text", "speech", "both"))
    assert "rewards/speech_margins" in logged[-1] and "logps/chosen_speech" in logged[-1]


# ------------------------------------------------------------------------------------------------ references
def _heldout_batch(trainer, seed=7):
    return _collate(trainer, synthetic_rows(1, seed=seed))


def test_reference_explicit_frozen_copy_and_default_copy(processor, tmp_path):
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.02, seed=9)
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer = make_trainer(model, synthetic_rows(1, seed=1), processor, tmp_path / "a", ref_model=ref, max_steps=2)
    trainer.train()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_state.items())
    assert not any(p.requires_grad for p in ref.parameters())
    batch = _heldout_batch(trainer)
    with torch.no_grad():
        got = trainer.reference_answer_log_probs(batch)
        want = ref.sequence_log_probs(**batch)
    torch.testing.assert_close(torch.cat([got["chosen_text"], got["rejected_text"]]), want["text"])
    torch.testing.assert_close(torch.cat([got["chosen_speech"], got["rejected_speech"]]), want["speech"])

    # ref_model=None, full fine-tuning: the trainer keeps a frozen copy of the initial model
    fresh = tiny_model(0)
    initial = tiny_model(0).eval()
    trainer = make_trainer(fresh, synthetic_rows(1, seed=1), processor, tmp_path / "b", max_steps=2)
    assert trainer.ref_model is not None and trainer.ref_model is not fresh
    trainer.train()
    with torch.no_grad():
        got = trainer.reference_answer_log_probs(batch)
        want = initial.sequence_log_probs(**batch)
        now = fresh.eval().sequence_log_probs(**batch)
    torch.testing.assert_close(torch.cat([got["chosen_text"], got["rejected_text"]]), want["text"])
    assert not torch.allclose(now["text"], want["text"])  # the policy moved, the reference did not


def test_reference_is_peft_base_with_adapter_disabled(processor, tmp_path):
    from peft import LoraConfig

    model = tiny_model(0)
    initial = tiny_model(0).eval()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_REGEX)
    trainer = make_trainer(
        model,
        synthetic_rows(2, seed=1),
        processor,
        tmp_path,
        peft_config=lora,
        max_steps=3,
        learning_rate=1e-2,
        activation_checkpointing=True,  # switched off around each reference pass, back on for the policy
    )
    assert trainer.ref_model is None
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".layers.")[1].split(".")[2] for n in names} == {"q_proj", "v_proj"}
    assert all(n.startswith("base_model.model.language_model.") for n in names)
    trainer.train()
    assert trainer.model.is_activation_checkpointing if hasattr(trainer.model, "is_activation_checkpointing") else True
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    batch = _heldout_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        ref = trainer.reference_answer_log_probs(batch)
        base = initial.sequence_log_probs(**batch)
        policy = trainer.answer_log_probs(trainer.model, batch)
    torch.testing.assert_close(
        torch.cat([ref["chosen_text"], ref["rejected_text"]]), base["text"], rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        torch.cat([ref["chosen_speech"], ref["rejected_speech"]]), base["speech"], rtol=1e-5, atol=1e-4
    )
    assert float((policy["chosen"] - ref["chosen"]).abs().max()) > 1e-3  # adapter on: the trained policy


def test_peft_model_keeps_its_initial_adapter_as_reference_and_feeds_compute_metrics(processor, tmp_path):
    """A PeftModel passed in (here from the LoRA helper, LLM + SRH): TRL freezes a copy of its adapter as "ref"."""
    from peft import get_peft_model

    from fun_audio_chat.trainers.lora import fun_audio_chat_lora_config

    initial = tiny_model(0).eval()
    model = get_peft_model(tiny_model(0), fun_audio_chat_lora_config("both", r=4, projections=("q", "v")))
    trainer = make_trainer(model, synthetic_rows(2, seed=1), processor, tmp_path, max_steps=3, learning_rate=1e-2)
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "ref"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".ref." in n for n in trainable)
    assert any("audio_invert_tower" in n for n in trainable) and any("language_model" in n for n in trainable)
    trainer.train()
    batch = _heldout_batch(trainer)
    model.eval()
    with torch.no_grad():
        ref = trainer.reference_answer_log_probs(batch)
        base = initial.sequence_log_probs(**batch)  # the fresh adapter was a no-op: reference == base model
    torch.testing.assert_close(
        torch.cat([ref["chosen_speech"], ref["rejected_speech"]]), base["speech"], rtol=1e-5, atol=1e-4
    )

    seen = {}

    def compute_metrics(prediction):
        seen["predictions"], seen["label_ids"] = prediction.predictions, prediction.label_ids
        return {"pair_accuracy": float((prediction.predictions[:, 0] > prediction.predictions[:, 1]).mean())}

    trainer.compute_metrics = compute_metrics
    from datasets import Dataset

    metrics = trainer.evaluate(Dataset.from_list(synthetic_rows(1, seed=9)))
    assert seen["predictions"].shape == (3, 2)
    assert [trainer.task_names[i] for i in seen["label_ids"]] == ["text", "speech", "both"]
    assert metrics["eval_pair_accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)


def test_model_and_processor_loaded_from_a_path(processor, tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    from datasets import Dataset

    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.trainers.dpo import FunAudioChatDPOTrainer

    from .dpo_helpers import dpo_config

    trainer = FunAudioChatDPOTrainer(
        str(tmp_path / "ckpt"), args=dpo_config(tmp_path / "out"), train_dataset=Dataset.from_list(synthetic_rows(1, 3))
    )
    assert isinstance(trainer.model, FunAudioChatForConditionalGeneration)
    assert isinstance(trainer.ref_model, FunAudioChatForConditionalGeneration)
    batch = _heldout_batch(trainer)
    with torch.no_grad():
        assert abs(float(trainer.compute_loss(trainer.model, batch)) - math.log(2)) < 1e-6


def test_reference_precomputed_log_probs(processor, tmp_path):
    model = tiny_model(0)
    initial = tiny_model(0).eval()
    rows = synthetic_rows(1, seed=1)
    trainer = make_trainer(model, rows, processor, tmp_path, precompute_ref_log_probs=True, max_steps=2)
    assert trainer.ref_model is None
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        want = initial.sequence_log_probs(**batch)
    stored = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    torch.testing.assert_close(stored[:, 0], want["text"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stored[:, 1], want["speech"], rtol=1e-5, atol=1e-4)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0
    with torch.no_grad():  # after training the reference still comes from the stored columns
        ref = trainer.reference_answer_log_probs(batch)
    torch.testing.assert_close(
        torch.cat([ref["chosen_text"], ref["rejected_text"]]), want["text"], rtol=1e-5, atol=1e-4
    )


def test_gradient_checkpointing_gives_the_same_gradients(processor, tmp_path):
    rows = synthetic_rows(1, seed=3)
    model = tiny_model(0)
    ref = perturbed_copy(model, scale=0.05, seed=2)
    plain = make_trainer(model, rows, processor, tmp_path / "a", ref_model=ref)
    loss_a, grads_a = _loss_and_grads(plain, _collate(plain, rows))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    checkpointed = make_trainer(model, rows, processor, tmp_path / "b", ref_model=ref, activation_checkpointing=True)
    loss_b, grads_b = _loss_and_grads(checkpointed, _collate(checkpointed, rows))
    disable()
    assert abs(loss_a - loss_b) < 1e-6
    assert max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a) < 1e-5


# -------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@two_processes
def test_two_process_ddp_lora_full_and_precomputed(tmp_path):
    """torchrun, 2 CPU processes (gloo): LoRA, full fine-tuning with a frozen reference, precomputed reference."""
    script = Path(__file__).with_name("dpo_ddp_script.py")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for run in ("lora", "full", "precompute"):
        records = [r[run] for r in ranks]
        assert [r["world_size"] for r in records] == [2, 2], run
        assert all(r["wrapper"] == "DistributedDataParallel" for r in records), run
        # each process trained on its own shard; equal parameters mean the gradients were all-reduced
        assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], rel=1e-12), run
        logged = [h for h in records[0]["log_history"] if "loss" in h]
        assert len(logged) == 3 and all(math.isfinite(h["loss"]) for h in logged), run
        assert any(key.startswith("rewards/") and key.count("/") == 2 for key in logged[-1]), run
    assert ranks[0]["lora"]["lora_b_norm"] > 0
    assert ranks[0]["lora"]["num_trainable"] < ranks[0]["full"]["num_trainable"] / 10
    assert ranks[0]["full"]["reference_unchanged"] and ranks[1]["full"]["reference_unchanged"]
    for rank in ranks:  # every pair got its reference log-probs, computed across both processes
        assert rank["precompute"]["num_pairs"] == 6
        assert rank["precompute"]["ref_max_diff"] < 1e-3
