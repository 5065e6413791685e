"""The detokenizer is a transformers ``PreTrainedModel``: Auto classes, ``dtype``, ``device_map`` (CPU and disk
offload), strict checkpoints, the config classes' round trip, and folders converted before the move."""

from __future__ import annotations

import json

import pytest
import torch

from fun_audio_chat import CosyVoice3Detokenizer
from fun_audio_chat.token2wav import CheckpointFormatError, CosyVoice3Config, CosyVoice3FlowConfig

CODES = torch.arange(40) * 7 % 296


def test_auto_classes_load_a_saved_detokenizer(tiny, tmp_path):
    from transformers import AutoConfig, AutoModel

    tiny.save_pretrained(tmp_path / "det")
    saved = json.loads((tmp_path / "det" / "config.json").read_text())
    assert saved["model_type"] == "cosyvoice3_token2wav"
    assert saved["architectures"] == ["CosyVoice3Detokenizer"]
    assert saved["flow"]["model_type"] == "cosyvoice3_flow" and saved["hift"]["model_type"] == "cosyvoice3_hift"
    config = AutoConfig.from_pretrained(tmp_path / "det")
    assert isinstance(config, CosyVoice3Config) and config.flow.hidden_size == tiny.config.flow.hidden_size
    model = AutoModel.from_pretrained(tmp_path / "det")
    assert type(model) is CosyVoice3Detokenizer and not model.training
    torch.testing.assert_close(model(CODES), tiny(CODES), atol=1e-6, rtol=0)


def test_subfolder_loads_the_detokenizer_beside_a_model_at_the_root(tiny, tmp_path):
    # a released model folder: the LLM's config.json + model.safetensors at the root, the detokenizer in token2wav/
    tiny.save_pretrained(tmp_path / "release" / "token2wav")
    (tmp_path / "release" / "config.json").write_text(json.dumps({"model_type": "fun_audio_chat"}))
    (tmp_path / "release" / "model.safetensors").write_bytes(b"not the detokenizer")
    model = CosyVoice3Detokenizer.from_pretrained(tmp_path / "release", subfolder="token2wav")
    torch.testing.assert_close(model(CODES), tiny(CODES), atol=1e-6, rtol=0)
    with pytest.raises(CheckpointFormatError, match="subfolder='vocoder'"):
        CosyVoice3Detokenizer.from_pretrained(tmp_path / "release", subfolder="vocoder")


def test_config_round_trip_keeps_every_field(tmp_path):
    config = CosyVoice3Config(flow={"vocab_size": 296, "num_layers": 3}, hift={"upsample_rates": [8, 5, 3]})
    config.save_pretrained(tmp_path)
    loaded = CosyVoice3Config.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.flow, CosyVoice3FlowConfig) and loaded.flow.vocab_size == 296
    assert loaded.hift.samples_per_frame == 480 and loaded.sample_rate == 24000


def test_bf16_keeps_vocoder_rotary_and_speaker_in_float32(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "det")
    half = CosyVoice3Detokenizer.from_pretrained(tmp_path / "det", dtype=torch.bfloat16)
    assert half.flow.estimator.blocks[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert half.flow.estimator.rotary_inv_freq.dtype == torch.float32
    assert half.speaker_embedding.dtype == torch.float32
    assert {p.dtype for p in half.hift.parameters()} == {torch.float32}


# accelerate names the root buffer "not a submodule" but needs it placed all the same
@pytest.mark.filterwarnings("ignore:The following device_map keys")
def test_device_map_with_cpu_and_disk_offload_gives_the_same_audio(tiny, tmp_path):
    pytest.importorskip("accelerate")
    tiny.save_pretrained(tmp_path / "det")
    on_cpu = CosyVoice3Detokenizer.from_pretrained(tmp_path / "det", device_map="cpu")
    torch.testing.assert_close(on_cpu(CODES), tiny(CODES), atol=1e-6, rtol=0)
    # the vocoder on disk: accelerate's hooks bring its weights in for each call
    offloaded = CosyVoice3Detokenizer.from_pretrained(
        tmp_path / "det",
        device_map={"flow": "cpu", "hift": "disk", "speaker_embedding": "cpu"},
        offload_folder=str(tmp_path / "offload"),
    )
    torch.testing.assert_close(offloaded(CODES), tiny(CODES), atol=1e-6, rtol=0)


def test_missing_or_unexpected_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny.save_pretrained(tmp_path / "det")
    weights = tmp_path / "det" / "model.safetensors"
    state = load_file(str(weights))
    del state["flow.token_embedding.weight"]
    state["flow.extra.weight"] = torch.zeros(1)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"missing \['flow.token_embedding.weight'\]"):
        CosyVoice3Detokenizer.from_pretrained(tmp_path / "det")


def test_folder_converted_before_the_move_still_loads(tiny, tmp_path):
    """The earlier format: a dataclass config.json without sub-config model types, the speaker in its own file."""
    from safetensors.torch import save_file

    folder = tmp_path / "old"
    tiny.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    legacy = {"model_type": "cosyvoice3_token2wav", "noise_seed": 0}
    legacy["flow"] = {k: v for k, v in config["flow"].items() if k in CosyVoice3FlowConfig.__dataclass_fields__}
    legacy["flow"].pop("model_type", None)
    legacy["hift"] = {k: v for k, v in config["hift"].items() if not k.startswith(("_", "transformers"))}
    legacy["hift"].pop("model_type", None)
    (folder / "config.json").write_text(json.dumps(legacy))
    voice = torch.randn(1, 192)
    save_file({"embedding": voice}, str(folder / "speaker_embedding.safetensors"))
    loaded = CosyVoice3Detokenizer.from_pretrained(folder)
    assert torch.equal(loaded.speaker_embedding, voice)
    assert loaded.config.flow.vocab_size == tiny.config.flow.vocab_size


def test_a_new_model_is_initialised_and_speaks_with_the_default_voice():
    from fun_audio_chat.token2wav.configuration_cosyvoice3 import tiny_token2wav_config
    from fun_audio_chat.token2wav.modeling_cosyvoice3 import default_speaker_embedding

    model = CosyVoice3Detokenizer(tiny_token2wav_config())
    assert torch.equal(model.speaker_embedding, default_speaker_embedding())
    window = torch.hann_window(model.config.hift.n_fft, periodic=True, dtype=torch.float64).float()
    assert torch.equal(model.hift.stft_window, window)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    wave = model.eval()(CODES)
    assert wave.shape == (40 * 960,) and torch.isfinite(wave).all()
