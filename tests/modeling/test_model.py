"""Config, loading, saving, registration and input validation of FunAudioChatForConditionalGeneration."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoModelForSeq2SeqLM

from fun_audio_chat import FunAudioChatConfig, FunAudioChatForConditionalGeneration
from fun_audio_chat.tiny import tiny_config

from . import oracle

OFFICIAL_8B = Path(__file__).resolve().parents[1] / "fixtures" / "official_8b"


def _expected_8b_shapes() -> dict[str, tuple[int, ...]]:
    """docs/official-format.md#state-dict parameter table, written out independently of the model code."""
    shapes = {}
    enc = "continuous_audio_tower."
    shapes.update(
        {
            enc + "conv1.weight": (1280, 128, 3),
            enc + "conv1.bias": (1280,),
            enc + "conv2.weight": (1280, 1280, 3),
            enc + "conv2.bias": (1280,),
            enc + "ln_post.weight": (1280,),
            enc + "ln_post.bias": (1280,),
            enc + "proj.weight": (4096, 1280),
            enc + "proj.bias": (4096,),
            enc + "audio_bos_eos_token.weight": (2, 4096),
        }
    )
    for i in range(32):
        p = f"{enc}layers.{i}."
        for name in ("q_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (1280, 1280)
            shapes[p + f"self_attn.{name}.bias"] = (1280,)
        shapes[p + "self_attn.k_proj.weight"] = (1280, 1280)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + f"{norm}.weight"] = (1280,)
            shapes[p + f"{norm}.bias"] = (1280,)
        shapes[p + "fc1.weight"], shapes[p + "fc1.bias"] = (5120, 1280), (5120,)
        shapes[p + "fc2.weight"], shapes[p + "fc2.bias"] = (1280, 5120), (1280,)
    shapes["audio_tower.embed_tokens.weight"] = (6565, 4096)
    shapes["audio_tower.output_matching.weight"] = (4096, 4096)
    shapes["audio_tower.continual_output_matching.weight"] = (4096, 4096)
    srh = "audio_invert_tower."
    shapes.update(
        {
            srh + "pre_matching.weight": (20480, 4096),
            srh + "pre_matching.bias": (20480,),
            srh + "input_matching.weight": (1024, 4096),
            srh + "output_matching.weight": (4096, 1024),
            srh + "crq_transformer.norm.weight": (1024,),
            srh + "lm_head.weight": (6565, 4096),
        }
    )
    for i in range(28):
        p = f"{srh}crq_transformer.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (2048, 1024)
        shapes[p + "self_attn.k_proj.weight"] = (1024, 1024)
        shapes[p + "self_attn.v_proj.weight"] = (1024, 1024)
        shapes[p + "self_attn.o_proj.weight"] = (1024, 2048)
        shapes[p + "self_attn.q_norm.weight"] = (128,)
        shapes[p + "self_attn.k_norm.weight"] = (128,)
        shapes[p + "mlp.gate_proj.weight"] = (3072, 1024)
        shapes[p + "mlp.up_proj.weight"] = (3072, 1024)
        shapes[p + "mlp.down_proj.weight"] = (1024, 3072)
        shapes[p + "input_layernorm.weight"] = (1024,)
        shapes[p + "post_attention_layernorm.weight"] = (1024,)
    lm = "language_model."
    shapes[lm + "model.embed_tokens.weight"] = (151936, 4096)
    shapes[lm + "model.norm.weight"] = (4096,)
    shapes[lm + "lm_head.weight"] = (151936, 4096)
    for i in range(36):
        p = f"{lm}model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (4096, 4096)
        shapes[p + "self_attn.k_proj.weight"] = (1024, 4096)
        shapes[p + "self_attn.v_proj.weight"] = (1024, 4096)
        shapes[p + "self_attn.o_proj.weight"] = (4096, 4096)
        shapes[p + "self_attn.q_norm.weight"] = (128,)
        shapes[p + "self_attn.k_norm.weight"] = (128,)
        shapes[p + "mlp.gate_proj.weight"] = (12288, 4096)
        shapes[p + "mlp.up_proj.weight"] = (12288, 4096)
        shapes[p + "mlp.down_proj.weight"] = (4096, 12288)
        shapes[p + "input_layernorm.weight"] = (4096,)
        shapes[p + "post_attention_layernorm.weight"] = (4096,)
    return shapes


def test_official_8b_config_on_meta_device_matches_spec_state_dict(capsys):
    config = AutoConfig.from_pretrained(OFFICIAL_8B)
    assert isinstance(config, FunAudioChatConfig)
    assert config.text_config.rope_parameters["rope_theta"] == 5000000
    with torch.device("meta"):
        model = FunAudioChatForConditionalGeneration(config)
    found = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert found == _expected_8b_shapes()
    # The tied SRH head shares the speech embedding table; the LLM head is its own matrix.
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    assert model.language_model.lm_head.weight is not model.language_model.model.embed_tokens.weight
    count = sum(p.numel() for p in model.parameters())
    with capsys.disabled():
        print(f"\n[meta 8B] parameters (tied counted once): {count:,}")
    assert 9.0e9 < count < 9.6e9


def test_official_config_saves_back_equivalently(tmp_path):
    config = AutoConfig.from_pretrained(OFFICIAL_8B)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((OFFICIAL_8B / "config.json").read_text())
    assert saved["model_type"] == "funaudiochat" and saved["audio_token_index"] == 151669
    for key, value in original["audio_config"].items():
        if key not in ("crq_transformer_config", "torch_dtype"):
            assert saved["audio_config"][key] == value, key
    for key in ("hidden_size", "num_hidden_layers", "audio_bos_index", "audio_eos_index", "sil_index", "vocab_size"):
        assert saved["text_config"][key] == original["text_config"][key], key
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    expected = config.to_dict()
    reloaded.pop("_name_or_path"), expected.pop("_name_or_path")
    assert reloaded == expected


def test_auto_classes_load_official_layout():
    for auto in (AutoModelForSeq2SeqLM, AutoModelForMultimodalLM):
        model = auto.from_pretrained(oracle.checkpoint_dir("train_b1"))
        assert isinstance(model, FunAudioChatForConditionalGeneration)


def test_official_checkpoint_with_dead_srh_embedding_loads_quietly(tmp_path):
    source = oracle.checkpoint_dir("train_b1")
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((source / name).read_text())
    tensors = load_file(source / "model.safetensors")
    assert "audio_invert_tower.lm_head.weight" not in tensors
    tensors["audio_invert_tower.crq_transformer.embed_tokens.weight"] = torch.randn(16, 32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.audio_invert_tower.lm_head.weight, tensors["audio_tower.embed_tokens.weight"])


def test_save_pretrained_round_trip_is_bit_identical_and_keeps_tie(tmp_path):
    model = FunAudioChatForConditionalGeneration.from_pretrained(oracle.checkpoint_dir("train_b1"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    saved_keys = set(load_file(tmp_path / "model.safetensors"))
    assert "audio_invert_tower.lm_head.weight" not in saved_keys or "audio_tower.embed_tokens.weight" not in saved_keys
    reloaded = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path)
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert reloaded.audio_invert_tower.lm_head.weight is reloaded.audio_tower.embed_tokens.weight


def test_bf16_loading_and_forward():
    model = FunAudioChatForConditionalGeneration.from_pretrained(
        oracle.checkpoint_dir("infer_b1"), dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16
    inputs = oracle.variant_inputs("infer_b1", "forward")
    with torch.no_grad():
        out = model(**inputs)
    reference = oracle.outputs("infer_b1", "forward")
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - reference["text_logits"]).abs().max() < 0.5


def test_forward_twice_is_identical_and_inputs_unchanged():
    model = oracle.load_model("train_b2")
    inputs = oracle.variant_inputs("train_b2", "with_labels")
    snapshot = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
    for name in ("loss", "text_loss", "speech_loss", "logits", "speech_logits"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    for key, value in inputs.items():
        assert torch.equal(value, snapshot[key]), f"forward mutated {key}"


def test_set_attn_implementation_reaches_the_speech_head():
    """The SRH backbone holds the audio config's own sub-config, so transformers' set_attn_implementation reaches
    its attention layers, as a string or as a dict naming the sub-config, without its "sub-model not found"
    warning; the backbone's one-row vocabulary does not leak into the config that is saved."""
    from transformers.testing_utils import CaptureLogger, LoggingLevel
    from transformers.utils import logging

    config = tiny_config()
    model = FunAudioChatForConditionalGeneration(config).eval()
    backbone = model.audio_invert_tower.crq_transformer
    assert backbone.config is model.config.audio_config.crq_transformer_config
    assert backbone.config.vocab_size == tiny_config().audio_config.crq_transformer_config.vocab_size > 1

    def srh_attention():
        return {layer.self_attn.config._attn_implementation for layer in backbone.layers}

    logger = logging.get_logger("transformers.modeling_utils")
    with LoggingLevel(logging.WARNING), CaptureLogger(logger) as captured:
        model.set_attn_implementation({"audio_config": {"crq_transformer_config": "eager"}})
        assert srh_attention() == {"eager"}
        assert model.language_model.config._attn_implementation == "sdpa"
        model.set_attn_implementation("sdpa")
        assert srh_attention() == {"sdpa"}
    assert "without finding the associated sub-model" not in captured.out


def test_eager_and_sdpa_audio_encoders_agree():
    """The official eager path scrambles heads (SPEC Q1); ours computes the same as SDPA."""
    sdpa = oracle.load_model("infer_b2_leftpad", attn="sdpa")
    eager = oracle.load_model("infer_b2_leftpad", attn="eager")
    assert eager.config.audio_config._attn_implementation == "eager"
    inputs = oracle.variant_inputs("infer_b2_leftpad", "forward")
    lengths = inputs["feature_attention_mask"].sum(-1)
    with torch.no_grad():
        a = sdpa.continuous_audio_tower(inputs["input_features"], lengths)
        b = eager.continuous_audio_tower(inputs["input_features"], lengths)
        out_a, out_b = sdpa(**inputs), eager(**inputs)
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 1e-5
    valid = inputs["attention_mask"].bool()
    assert (out_a.logits - out_b.logits).abs()[valid].max() < 1e-4


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration.from_pretrained(oracle.checkpoint_dir("train_b1"))
    model.config.halve_unpaired_audio_features = True
    inputs = oracle.variant_inputs("train_b1", "with_labels")
    model.train()
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.continuous_audio_tower.gradient_checkpointing
    loss = model(**inputs).loss
    loss.backward()
    for name, param in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(param.grad, reference[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"audio_config": {"output_dim": 32}}, "output_dim"),
        ({"audio_config": {"eos_token_id": 300}}, "outside the speech codebook"),
        ({"audio_config": {"group_size": 0}}, "group_size"),
        ({"text_config": {"sil_index": 999}}, "outside the text vocabulary"),
        ({"audio_config": {"continuous_features_mode": "concat"}}, "continuous_features_mode"),
    ],
)
def test_inconsistent_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def _infer_inputs():
    return oracle.variant_inputs("infer_b1", "forward")


def test_placeholder_count_mismatch_is_reported():
    model = oracle.load_model("infer_b1")
    inputs = _infer_inputs()
    ids = inputs["input_ids"].clone()
    first_audio = int((ids[0] == 505).nonzero()[0])
    ids[0, first_audio] = 198
    with pytest.raises(ValueError, match=r"8 <\|AUDIO\|> placeholders but the audios fill 9"):
        model(**{**inputs, "input_ids": ids})


def test_speech_ids_out_of_range_are_reported():
    model = oracle.load_model("infer_b1")
    inputs = _infer_inputs()
    bad = inputs["speech_ids"].clone()
    bad[0, 0] = 300
    with pytest.raises(ValueError, match="outside the speech codebook"):
        model(**{**inputs, "speech_ids": bad})


def test_mismatched_audio_rows_are_reported():
    model = oracle.load_model("infer_b1")
    inputs = _infer_inputs()
    doubled = torch.cat([inputs["input_features"], inputs["input_features"]])
    with pytest.raises(ValueError, match="input_features has 2 audio rows"):
        model(**{**inputs, "input_features": doubled})
    with pytest.raises(ValueError, match="feature_exist_mask has 2 rows"):
        model(**{**inputs, "feature_exist_mask": torch.tensor([True, True])})
    # an audio marked as having continuous features, given without them, was embedded from its (pad) codes alone
    without_features = {k: v for k, v in inputs.items() if k not in ("input_features", "feature_attention_mask")}
    with pytest.raises(ValueError, match="no input_features were given"):
        model(**without_features)


def test_audio_placeholders_without_audio_are_reported():
    model = oracle.load_model("infer_b1")
    inputs = _infer_inputs()
    with pytest.raises(ValueError, match="no speech_ids were given"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_tiny_random_model_trains_one_step():
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(tiny_config())
    model.config.halve_unpaired_audio_features = True
    inputs = oracle.variant_inputs("train_b2", "with_labels")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sequence_log_probs_match_the_training_losses():
    """Summed per-row log-probs, divided by the target counts, are the forward's mean losses."""
    model = oracle.load_model("train_b2")
    model.config.halve_unpaired_audio_features = True
    try:
        inputs = oracle.variant_inputs("train_b2", "with_labels")
        with torch.no_grad():
            out = model(**inputs)
            scores = model.sequence_log_probs(**inputs)
    finally:
        model.config.halve_unpaired_audio_features = False
    text_mean = -scores["text"].sum() / scores["text_tokens"].sum()
    speech_mean = -scores["speech"].sum() / scores["speech_tokens"].sum()
    assert abs(text_mean.item() - out.text_loss.item()) < 1e-4
    assert abs(speech_mean.item() - out.speech_loss.item()) < 1e-4
    assert scores["text"].shape == (2,) and (scores["speech_tokens"] > 0).all()


def test_return_loss_false_gives_the_same_targets_and_logits_without_losses():
    model = oracle.load_model("train_b2")
    inputs = oracle.variant_inputs("train_b2", "with_labels")
    with torch.no_grad():
        full = model(**inputs)
        bare = model(**inputs, return_loss=False)
    assert full.loss is not None and full.speech_loss is not None
    assert bare.loss is None and bare.text_loss is None and bare.speech_loss is None
    for name in ("logits", "speech_logits", "shift_labels", "speech_shift_labels"):
        assert torch.equal(getattr(bare, name), getattr(full, name)), name


def test_pickle_checkpoints_are_refused(tmp_path):
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((oracle.checkpoint_dir("train_b1") / name).read_text())
    torch.save(load_file(oracle.checkpoint_dir("train_b1") / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="refuses to unpickle"):
        FunAudioChatForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors checkpoints only"):
        FunAudioChatForConditionalGeneration.from_pretrained(oracle.checkpoint_dir("train_b1"), use_safetensors=False)


def test_from_pretrained_without_a_path_loads_the_given_state_dict():
    """transformers' ``from_pretrained(None, config=..., state_dict=...)``: no path is looked up."""
    config = tiny_config()
    model = FunAudioChatForConditionalGeneration(config)
    state_dict = model.state_dict()
    loaded = FunAudioChatForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict)
    assert all(torch.equal(state_dict[name], value) for name, value in loaded.state_dict().items())


def test_every_missing_weight_is_initialised_as_in_the_constructor():
    """``from_pretrained(None, config, state_dict={})`` initialises every weight (none left on the meta device) with
    the values ``__init__`` gives under the same seed: ``_init_weights`` covers all of the model's parameters."""
    from unittest import mock

    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        torch.manual_seed(42)
        original(*args, **kwargs)

    with mock.patch.object(PreTrainedModel, "_initialize_weights", seeded):
        from_init = FunAudioChatForConditionalGeneration(tiny_config())
        from_nothing = FunAudioChatForConditionalGeneration.from_pretrained(None, config=tiny_config(), state_dict={})
    tensors = [*from_nothing.named_parameters(), *from_nothing.named_buffers()]
    assert [name for name, value in tensors if value.device.type == "meta"] == []
    expected, got = from_init.state_dict(), from_nothing.state_dict()
    assert sorted(expected) == sorted(got)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []


@pytest.mark.parametrize("attn_implementation", [None, "eager"])
def test_composite_attention_dispatch_reaches_every_tower(tmp_path, attn_implementation):
    """Each tower's config carries the requested attention (SDPA by default): the audio towers share audio_config."""
    FunAudioChatForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path, **kwargs)
    expected = attn_implementation or "sdpa"
    for tower in (model.audio_tower, model.continuous_audio_tower, model.language_model):
        assert tower._supports_sdpa
        assert tower.config._attn_implementation == expected


def test_hub_kernels_are_off_unless_asked_for(tmp_path):
    """transformers >= 5.25 kernelizes by default; our loads stay on torch modules (parity, offline, compile) and an
    explicit ``use_kernels=True`` still reaches transformers. On CPU a kernelized model computes the same logits."""
    import transformers
    from packaging import version

    FunAudioChatForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    plain = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert plain.use_kernels is False
    try:
        kernelized = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path, use_kernels=True).eval()
    except ValueError as error:  # the installed `kernels` release does not match this transformers
        assert "Kernels are not available" in str(error)
        assert version.parse(transformers.__version__) < version.parse("5.25")
        return
    assert kernelized.use_kernels is True
    inputs = {"input_ids": torch.tensor([[501, 11, 104, 105, 502, 501, 12]])}
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, kernelized(**inputs).logits)
