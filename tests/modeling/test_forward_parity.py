"""Forward parity with the official implementation (tests/fixtures/oracle), fp32.

Training cases run under ``training_recipe="official"``, which reproduces the official training forward (the
default "consistent" recipe feeds training what generation does; see docs/training.md).
Left-padded rows are compared on their valid positions only (fully masked positions are undefined).
"""

import pytest
import torch

from . import oracle

ATOL = 1e-4
FORWARD_CASES = [
    ("train_b1", "with_labels", True),
    ("train_b1", "no_labels", True),
    ("train_b2", "with_labels", True),
    ("train_b2", "with_labels_and_position_ids", True),
    ("infer_b1", "forward", False),
    ("infer_b2_leftpad", "forward", False),
    ("infer_b2_leftpad", "forward_with_generate_position_ids", False),
]


def _intermediates(model, inputs):
    """Recompute the oracle's recorded intermediates with the model's public building blocks."""
    merged = model._merged_for_labels(inputs)
    padded_length = merged.padded_speech_ids.shape[1]
    encoded = model.continuous_audio_tower(inputs["input_features"], inputs["feature_attention_mask"].sum(-1))
    continuous = torch.zeros(len(encoded), padded_length, encoded[0].shape[-1])
    for row, frames in enumerate(encoded):
        continuous[row, : min(len(frames), padded_length)] = frames[:padded_length]
    grouped, _, _ = model.encode_audio(
        inputs["speech_ids"],
        inputs.get("speech_attention_mask"),
        inputs["input_features"],
        inputs["feature_attention_mask"],
        inputs["feature_exist_mask"],
    )
    found = {
        "continuous_audio_tower_out": continuous,
        "discrete_encoder_out": grouped,
        "lm_inputs_embeds": merged.inputs_embeds,
    }
    if "labels" in inputs:
        labels = inputs["labels"]
        found["lm_labels_after_merge"] = model.build_text_labels(labels, merged, inputs.get("text_attention_mask"))
        speech_labels = model.build_speech_labels(labels, merged)
        found["speech_labels"] = speech_labels
        batch, length = labels.shape
        # The oracle records the SRH's code embeddings before the -(k-1) roll; undo ours to compare.
        rolled = model.teacher_forcing_embeddings(speech_labels)
        found["srh_audio_embeds"] = torch.roll(rolled, model.group_size - 1, dims=1).reshape(batch, length, -1)
    return merged, found


@pytest.mark.parametrize("case,variant,official", FORWARD_CASES)
def test_forward_matches_official(case, variant, official):
    model = oracle.load_model(case)
    if official:
        model.config.training_recipe = "official"
    inputs = oracle.variant_inputs(case, variant)
    reference = oracle.outputs(case, variant)
    try:
        with torch.no_grad():
            out = model(**inputs, return_last_hidden_state=True)
            merged, intermediates = _intermediates(model, inputs)
    finally:
        model.config.training_recipe = "consistent"

    valid = inputs["attention_mask"].bool()
    valid_sub = valid.repeat_interleave(model.group_size, dim=1)
    compared = {
        "text_logits": (out.logits, valid),
        "speech_logits": (out.speech_logits, valid_sub),
        "lm_last_hidden_state": (out.last_hidden_state, valid),
        "srh_inputs_embeds": (out.last_hidden_state + merged.text_embeds, valid),
    }
    for name, (ours, mask) in compared.items():
        diff = (ours - reference[name]).abs()[mask].max().item()
        assert diff < ATOL, f"{name}: max abs diff {diff}"
    for name, ours in intermediates.items():
        theirs = reference[name]
        assert ours.shape == theirs.shape, name
        if theirs.dtype.is_floating_point:
            diff = (ours - theirs).abs().max().item()
            assert diff < ATOL, f"{name}: max abs diff {diff}"
        else:
            assert torch.equal(ours, theirs), name
    for name in ("loss", "text_loss", "speech_loss"):
        if name in reference:
            diff = abs(getattr(out, name).item() - reference[name].item())
            assert diff < ATOL, f"{name}: {getattr(out, name).item()} vs {reference[name].item()}"


def test_training_default_does_not_halve_user_audio():
    """Without the flag, user-audio rows (no transcript) keep their full features, as at inference."""
    model = oracle.load_model("train_b1")
    inputs = oracle.variant_inputs("train_b1", "with_labels")
    with torch.no_grad():
        merged = model.merge_audio(
            *(inputs[k] for k in ("input_ids", "speech_ids", "speech_attention_mask", "input_features")),
            inputs["feature_attention_mask"],
            inputs["feature_exist_mask"],
            inputs["text_ids"],
            inputs["text_attention_mask"],
        )
        grouped, _, _ = model.encode_audio(
            inputs["speech_ids"],
            inputs["speech_attention_mask"],
            inputs["input_features"],
            inputs["feature_attention_mask"],
            inputs["feature_exist_mask"],
        )
    user_row = int(inputs["feature_exist_mask"].nonzero()[0])
    n_user = int(merged.groups_per_audio[user_row])
    user_slots = merged.inputs_embeds[merged.audio_slots][:n_user]
    torch.testing.assert_close(user_slots, grouped[user_row, :n_user])
