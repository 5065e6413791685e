"""LoRA presets: scoping (LLM / SRH / both), save-reload-merge round trips, training and generate on PEFT."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from fun_audio_chat.trainers import FunAudioChatTrainer, fun_audio_chat_lora_config, lora_target_regex

from .helpers import ORACLE, collate, oracle_examples, oracle_model, train_dataset, training_args

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def adapted_modules(peft_model):
    return sorted(
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in peft_model.named_modules()
        if n.endswith(".lora_A")
    )


@pytest.mark.parametrize("scope", ["llm", "srh", "both"])
def test_scopes_target_exactly_their_projections(scope):
    model = oracle_model()
    prefixes = {"llm": ("language_model.model.layers.",), "srh": ("audio_invert_tower.crq_transformer.layers.",)}
    prefixes["both"] = prefixes["llm"] + prefixes["srh"]
    want = sorted(
        n for n, _ in model.named_modules() if n.startswith(prefixes[scope]) and n.rsplit(".", 1)[-1] in PROJECTIONS
    )
    assert len(want) == 14 * len(prefixes[scope])  # 2 layers x 7 projections per stack
    peft_model = get_peft_model(model, fun_audio_chat_lora_config(scope, r=4))
    assert adapted_modules(peft_model) == want
    # the Whisper-style encoder's own q/k/v projections are never adapted
    assert not any(n.startswith("continuous_audio_tower") for n in adapted_modules(peft_model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = any("modules_to_save" in n for n in trainable)
    assert saved == (scope != "llm")  # SRH in/out matching layers train in full with an SRH adapter


def test_target_regex_options():
    regex = lora_target_regex("llm", projections=("q_proj", "down"), layers=[1])
    assert re.fullmatch(regex, "language_model.model.layers.1.self_attn.q_proj")
    assert re.fullmatch(regex, "language_model.model.layers.1.mlp.down_proj")
    assert not re.fullmatch(regex, "language_model.model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(regex, "language_model.model.layers.1.self_attn.k_proj")
    assert not re.fullmatch(regex, "audio_invert_tower.crq_transformer.layers.1.self_attn.q_proj")
    with pytest.raises(ValueError):
        lora_target_regex("encoder")
    config = fun_audio_chat_lora_config("llm", r=8, train_audio_adapters=True)
    assert config.r == 8 and config.lora_alpha == 16 and "audio_tower.output_matching" in config.modules_to_save


def _random_adapter(scope):
    torch.manual_seed(0)
    # init_lora_weights=False: non-zero B, so the adapter really changes the outputs
    return get_peft_model(oracle_model(), fun_audio_chat_lora_config(scope, r=4, init_lora_weights=False)).eval()


@pytest.mark.parametrize("scope", ["llm", "both"])
def test_save_reload_merge_round_trip(tmp_path, scope):
    batch = collate(oracle_examples())
    peft_model = _random_adapter(scope)
    with torch.no_grad():
        base_out = oracle_model()(**batch)
        out = peft_model(**batch)
    assert (out.logits - base_out.logits).abs().max() > 1e-2  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == lora_target_regex(scope)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(("lora_" in k) or ("audio_invert_tower" in k) for k in saved)

    reloaded = PeftModel.from_pretrained(oracle_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        out_reloaded = reloaded(**batch)
        merged = reloaded.merge_and_unload()
        out_merged = merged(**batch)
    assert type(merged).__name__ == "FunAudioChatForConditionalGeneration"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.equal(out_reloaded.logits, out.logits) and torch.equal(out_reloaded.speech_logits, out.speech_logits)
    torch.testing.assert_close(out_merged.logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_merged.speech_logits, out.speech_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_merged.loss, out.loss, atol=1e-5, rtol=1e-5)


def test_generate_on_the_peft_model():
    inputs = load_file(str(ORACLE / "gen_force_abos_b1" / "inputs.safetensors"))
    meta = json.loads((ORACLE / "gen_force_abos_b1" / "meta.json").read_text())
    inputs = {k: inputs[k] for k in meta["input_keys"]}
    controls = dict(
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=502,
        pad_token_id=500,
        force_audio_bos=True,
        speech_do_sample=False,
        return_dict_in_generate=True,
    )
    peft_model = _random_adapter("both")
    with torch.no_grad():
        out = peft_model.generate(**inputs, **controls)
        merged = peft_model.merge_and_unload()
        out_merged = merged.generate(**inputs, **controls)
        out_base = oracle_model().generate(**inputs, **controls)
    assert out.speech_ids.shape[-1] > 0
    assert torch.equal(out.sequences, out_merged.sequences)
    assert torch.equal(out.speech_ids, out_merged.speech_ids)
    assert not (torch.equal(out.sequences, out_base.sequences) and torch.equal(out.speech_ids, out_base.speech_ids))


def test_lora_training_with_the_trainer(tmp_path):
    model = oracle_model()
    frozen_before = model.language_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    peft_model = get_peft_model(model, fun_audio_chat_lora_config("both", r=4, lora_dropout=0.0))
    trainer = FunAudioChatTrainer(
        model=peft_model,
        args=training_args(tmp_path, max_steps=3, learning_rate=5e-3),
        train_dataset=train_dataset(),
        data_collator=collate,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all("speech_loss" in h for h in trainer.state.log_history if "loss" in h)
    assert torch.equal(
        peft_model.base_model.model.language_model.model.layers[0].mlp.up_proj.base_layer.weight, frozen_before
    )
