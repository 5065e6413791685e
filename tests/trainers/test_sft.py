"""SFT with the Trainer: per-stream loss normalisation and logging, freezing helpers, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from fun_audio_chat.trainers import FunAudioChatTrainer, count_loss_items, freeze_for_stage

from .helpers import ListDataset, collate, oracle_examples, oracle_model, train_dataset, training_args


def label_counts_from_model(model, batch):
    merged = model.merge_audio(
        batch["input_ids"],
        batch["speech_ids"],
        batch["speech_attention_mask"],
        batch["input_features"],
        batch["feature_attention_mask"],
        batch["feature_exist_mask"],
        batch["text_ids"],
        batch["text_attention_mask"],
    )
    text = model.build_text_labels(batch["labels"], merged, batch["text_attention_mask"])
    speech = model.build_speech_labels(batch["labels"], merged)
    k = model.group_size
    return int((text[:, 1:] != -100).sum()), int((speech[:, k:] != -100).sum())


def test_count_loss_items_matches_the_model_labels():
    model = oracle_model()
    examples = oracle_examples()
    with torch.no_grad():
        for batch in (collate(examples), collate(examples[:1]), collate(examples[1:]), collate(examples[::-1])):
            counts = count_loss_items(batch, model)
            assert counts == label_counts_from_model(model, batch)
            assert counts[0] > 0 and counts[1] > 0
    # no labels: nothing to count; text-only batch: no speech targets
    assert count_loss_items({"input_ids": torch.ones(1, 3, dtype=torch.long)}, model) == (0, 0)
    text_only = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[-100, -100, 3, 4]])}
    assert count_loss_items(text_only, model) == (2, 0)


def _one_step(trainer_cls, tmp_path, name, **overrides):
    model = oracle_model()
    args = training_args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, **overrides)
    trainer = trainer_cls(model=model, args=args, train_dataset=ListDataset(oracle_examples()), data_collator=collate)
    trainer.train()
    return model, trainer


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 1 with accumulation == 1 batch of 2, for both the text and the speech stream."""
    big, _ = _one_step(FunAudioChatTrainer, tmp_path, "big", per_device_train_batch_size=2)
    acc, trainer = _one_step(
        FunAudioChatTrainer, tmp_path, "acc", per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    start = oracle_model().state_dict()
    for (name, p_big), p_acc in zip(big.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(p_acc, p_big, atol=2e-6, rtol=1e-5, msg=name)
    moved = max((big.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3
    # the plain Trainer normalises the speech loss per micro-batch: visibly different (the test is sensitive)
    plain, _ = _one_step(Trainer, tmp_path, "plain", per_device_train_batch_size=1, gradient_accumulation_steps=2)
    diff = max((plain.state_dict()[k] - big.state_dict()[k]).abs().max().item() for k in start)
    assert diff > 1e-3


def test_text_and_speech_losses_are_logged(tmp_path):
    model = oracle_model()
    args = training_args(
        tmp_path,
        max_steps=3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=2,
    )
    trainer = FunAudioChatTrainer(
        model=model, args=args, train_dataset=train_dataset(), eval_dataset=train_dataset(1), data_collator=collate
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:
        assert h["text_loss"] > 0 and h["speech_loss"] > 0
        assert h["loss"] == pytest.approx(h["text_loss"] + h["speech_loss"], rel=1e-5)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_text_loss"] + metrics["eval_speech_loss"], rel=1e-5)
    with torch.no_grad():
        out = model.eval()(**collate(oracle_examples()))
    assert metrics["eval_text_loss"] == pytest.approx(out.text_loss.item(), rel=1e-5)
    assert metrics["eval_speech_loss"] == pytest.approx(out.speech_loss.item(), rel=1e-5)


def test_stream_losses_are_averaged_over_the_logging_window_and_the_evaluation(tmp_path):
    """Like TRL's trainers: each batch's text and speech losses are stored, and a log emits their mean since the last
    log (training) or over the loop (evaluation, with its metric prefix)."""
    model = oracle_model()
    examples = oracle_examples()
    with torch.no_grad():
        solo = [model(**collate([example])) for example in examples]
    expected = {name: sum(float(out[name]) for out in solo) / len(solo) for name in ("text_loss", "speech_loss")}
    args = training_args(
        tmp_path, max_steps=4, per_device_train_batch_size=1, learning_rate=0.0, logging_steps=2, seed=3
    )
    trainer = FunAudioChatTrainer(model=model, args=args, train_dataset=ListDataset(examples), data_collator=collate)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2  # each window covers both examples once (one epoch of 2 steps)
    for h in logs:
        assert h["text_loss"] == pytest.approx(expected["text_loss"], rel=1e-5)
        assert h["speech_loss"] == pytest.approx(expected["speech_loss"], rel=1e-5)
    trainer.args.per_device_eval_batch_size = 1
    metrics = trainer.evaluate(ListDataset(examples), metric_key_prefix="heldout")
    assert metrics["heldout_text_loss"] == pytest.approx(expected["text_loss"], rel=1e-5)
    assert metrics["heldout_speech_loss"] == pytest.approx(expected["speech_loss"], rel=1e-5)
    predicted = trainer.predict(ListDataset(examples[:1]))
    assert predicted.metrics["test_text_loss"] == pytest.approx(float(solo[0]["text_loss"]), rel=1e-5)


def test_freeze_for_pre_alignment_trains_audio_parts_only(tmp_path):
    model = oracle_model()
    summary = freeze_for_stage(model, "pre_alignment")
    assert summary["trainable_parameters"] > 0
    for name, p in model.named_parameters():
        frozen_part = name.startswith("language_model.") or "audio_bos_eos_token" in name
        assert p.requires_grad != frozen_part, name
    assert model.audio_invert_tower.lm_head.weight.requires_grad  # tied to the speech embedding: trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(tmp_path, max_steps=2, activation_checkpointing=True)
    FunAudioChatTrainer(model=model, args=args, train_dataset=train_dataset(), data_collator=collate).train()
    assert model.is_activation_checkpointing
    after = model.state_dict()
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        if name.startswith("language_model.") or "audio_bos_eos_token" in name:
            assert not changed, name
    for part in (
        "continuous_audio_tower.layers.0.fc1.weight",
        "audio_tower.output_matching.weight",
        "audio_invert_tower.pre_matching.weight",
        "audio_invert_tower.crq_transformer.layers.0.mlp.up_proj.weight",
    ):
        assert not torch.equal(after[part], before[part]), part


@pytest.mark.parametrize(
    "stage, trains, frozen",
    [
        ("llm", ["language_model.model.layers.0.mlp.up_proj.weight"], ["audio_tower.embed_tokens.weight"]),
        (
            "srh",
            ["audio_invert_tower.pre_matching.weight", "audio_tower.embed_tokens.weight"],
            ["language_model.lm_head.weight", "continuous_audio_tower.conv1.weight"],
        ),
        (
            "core_cocktail",
            ["language_model.lm_head.weight", "continuous_audio_tower.conv1.weight"],
            ["continuous_audio_tower.audio_bos_eos_token.weight"],
        ),
    ],
)
def test_freeze_stages(stage, trains, frozen):
    model = oracle_model()
    freeze_for_stage(model, stage, verbose=False)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in trains)
    assert not any(params[n].requires_grad for n in frozen)
    with pytest.raises(ValueError, match="unknown stage"):
        freeze_for_stage(model, "nope")


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    plain, _ = _one_step(FunAudioChatTrainer, tmp_path, "plain", per_device_train_batch_size=2)
    ckpt, _ = _one_step(
        FunAudioChatTrainer, tmp_path, "ckpt", per_device_train_batch_size=2, activation_checkpointing=True
    )
    assert ckpt.is_activation_checkpointing
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def _conversations():
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for seconds, transcript, n_codes, spoken in (
        (1.1, "hello there", 40, True),
        (0.8, "good morning", 0, False),
        (1.4, "thank you", 53, True),
    ):
        audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
        reply = [{"type": "text", "text": transcript}]
        if spoken:
            reply.append({"type": "audio", "speech_codes": rng.integers(0, 296, size=n_codes).tolist()})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio", "audio": audio, "sampling_rate": 16000}]},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return rows


def test_out_of_the_box_with_the_processor_collator(tmp_path):
    """Conversations -> FunAudioChatDataCollator -> FunAudioChatTrainer with the library's default arguments."""
    processing = pytest.importorskip("fun_audio_chat.processing")
    from fun_audio_chat.tiny import tiny_processor
    from fun_audio_chat.trainers import sft_training_arguments

    from .helpers import tiny_model

    collator = processing.FunAudioChatDataCollator(tiny_processor())
    rows = _conversations()
    model = tiny_model()
    batch = collator(rows)  # a text reply and two spoken replies in one batch
    with torch.no_grad():
        assert count_loss_items(batch, model) == label_counts_from_model(model, batch)
    args = sft_training_arguments(
        tmp_path,
        per_device_train_batch_size=3,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = FunAudioChatTrainer(model=model, args=args, train_dataset=ListDataset(rows * 2), data_collator=collator)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["text_loss"] > 0 and h["speech_loss"] > 0 for h in logs)
