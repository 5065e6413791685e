"""LoRA on Fun-Audio-Chat, the way PEFT tests custom models: one table of configurations (:data:`CASES`) crossed
with one battery of checks (targets, only adapters trainable, save/load, merge-and-unload equality, generate), plus
the regex options and a training run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from fun_audio_chat.trainers import FunAudioChatTrainer, fun_audio_chat_lora_config, lora_target_regex
from fun_audio_chat.trainers.lora import AUDIO_ADAPTER_MODULES, SRH_MODULES_TO_SAVE

from .helpers import ORACLE, collate, oracle_examples, oracle_model, train_dataset, training_args

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLM = "language_model.model.layers."
SRH = "audio_invert_tower.crq_transformer.layers."


@dataclass(frozen=True)
class LoraCase:
    """A ``fun_audio_chat_lora_config`` call and what it must adapt: the projections of ``stacks`` (layer-name
    prefixes) named in ``projections`` in ``layers`` (all when ``None``), plus ``modules_to_save`` trained in full."""

    name: str
    config: dict
    stacks: tuple[str, ...]
    projections: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = field(default=())

    def adapts(self, module_name: str) -> bool:
        for stack in self.stacks:
            if module_name.startswith(stack):
                layer, _, rest = module_name.removeprefix(stack).partition(".")
                in_layers = self.layers is None or int(layer) in self.layers
                return in_layers and rest.rsplit(".", 1)[-1] in self.projections and rest.count(".") == 1
        return False


CASES = [
    LoraCase("llm", {"scope": "llm"}, (LLM,)),
    LoraCase("srh", {"scope": "srh"}, (SRH,), modules_to_save=SRH_MODULES_TO_SAVE),
    LoraCase("both", {"scope": "both"}, (LLM, SRH), modules_to_save=SRH_MODULES_TO_SAVE),
    LoraCase(
        "llm-q-v-layer-1",
        {"scope": "llm", "projections": ("q", "v_proj"), "layers": [1]},
        (LLM,),
        projections=("q_proj", "v_proj"),
        layers=(1,),
    ),
    LoraCase(
        "llm-mlp-with-audio-adapters",
        {"scope": "llm", "projections": ("gate", "up", "down"), "train_audio_adapters": True},
        (LLM,),
        projections=("gate_proj", "up_proj", "down_proj"),
        modules_to_save=AUDIO_ADAPTER_MODULES,
    ),
    LoraCase("srh-without-modules-to-save", {"scope": "srh", "modules_to_save": None}, (SRH,)),
]
by_case = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def adapted_modules(peft_model) -> list[str]:
    return sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in peft_model.named_modules()
        if name.endswith(".lora_A")
    )


def peft_model_of(case: LoraCase, random_adapter: bool = True):
    """The oracle model with the case's adapter; ``random_adapter``: non-zero B (``init_lora_weights=False``) and
    perturbed full-trained modules, so the adapter changes the outputs."""
    torch.manual_seed(0)
    config = fun_audio_chat_lora_config(r=4, init_lora_weights=not random_adapter, **case.config)
    peft_model = get_peft_model(oracle_model(), config)
    if random_adapter:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return peft_model.eval()


def outputs_of(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return {"logits": out.logits, "speech_logits": out.speech_logits, "loss": out.loss}


# ---------------------------------------------------------------------------------------------------- battery
@by_case
def test_targets_exactly_the_cases_projections(case):
    model = oracle_model()
    want = sorted(name for name, _ in model.named_modules() if case.adapts(name))
    assert want  # the table names modules that exist
    peft_model = get_peft_model(model, fun_audio_chat_lora_config(r=4, **case.config))
    assert adapted_modules(peft_model) == want
    # the Whisper-style encoder's own q/k/v projections are never adapted
    assert not any(name.startswith("continuous_audio_tower") for name in adapted_modules(peft_model))


@by_case
def test_only_the_adapter_and_the_modules_to_save_train(case):
    peft_model = peft_model_of(case, random_adapter=False)
    trainable = [name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if ".lora_" in name]
    full = sorted({name.split(".modules_to_save.")[0] for name in trainable if ".modules_to_save." in name})
    assert sorted(lora + [n for n in trainable if ".modules_to_save." in n]) == sorted(trainable)
    assert len(lora) == 2 * len(adapted_modules(peft_model))  # A and B of every adapted projection
    assert full == sorted(case.modules_to_save)


@by_case
def test_save_load_round_trip_gives_identical_outputs(case, tmp_path):
    batch = collate(oracle_examples())
    peft_model = peft_model_of(case)
    out, base = outputs_of(peft_model, batch), outputs_of(oracle_model(), batch)
    changed = [key for key in ("logits", "speech_logits") if (out[key] - base[key]).abs().max() > 1e-3]
    assert changed  # the adapter matters, so the comparisons below can fail
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == lora_target_regex(
        case.config["scope"], case.config.get("projections", PROJECTIONS), case.config.get("layers")
    )
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in key or any(m in key for m in case.modules_to_save) for key in saved)
    reloaded = PeftModel.from_pretrained(oracle_model(), tmp_path / "adapter").eval()
    for key, value in outputs_of(reloaded, batch).items():
        assert torch.equal(value, out[key]), key


@by_case
def test_merge_and_unload_equals_the_adapted_model(case):
    batch = collate(oracle_examples())
    peft_model = peft_model_of(case)
    out = outputs_of(peft_model, batch)
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "FunAudioChatForConditionalGeneration"
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    for key, value in outputs_of(merged, batch).items():
        torch.testing.assert_close(value, out[key], atol=1e-4, rtol=1e-4, msg=key)


@by_case
def test_generate_on_the_peft_model_equals_the_merged_model(case):
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
    peft_model = peft_model_of(case)
    with torch.no_grad():
        out = peft_model.generate(**inputs, **controls)
        out_merged = peft_model.merge_and_unload().generate(**inputs, **controls)
    assert out.speech_ids.shape[-1] > 0
    assert torch.equal(out.sequences, out_merged.sequences)
    assert torch.equal(out.speech_ids, out_merged.speech_ids)


# ---------------------------------------------------------------------------------------------- the rest
def test_target_regex_options():
    regex = lora_target_regex("llm", projections=("q_proj", "down"), layers=[1])
    assert re.fullmatch(regex, "language_model.model.layers.1.self_attn.q_proj")
    assert re.fullmatch(regex, "language_model.model.layers.1.mlp.down_proj")
    assert not re.fullmatch(regex, "language_model.model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(regex, "language_model.model.layers.1.self_attn.k_proj")
    assert not re.fullmatch(regex, "audio_invert_tower.crq_transformer.layers.1.self_attn.q_proj")
    for bad in ({"scope": "encoder"}, {"projections": ("qkv",)}, {"projections": ()}):
        with pytest.raises(ValueError):
            lora_target_regex(**bad)
    config = fun_audio_chat_lora_config("llm", r=8, train_audio_adapters=True)
    assert config.r == 8 and config.lora_alpha == 16 and "audio_tower.output_matching" in config.modules_to_save
    with pytest.raises(ValueError, match="both a LoRA target"):
        fun_audio_chat_lora_config("llm", modules_to_save=["language_model.model.layers.0.self_attn.q_proj"])


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
