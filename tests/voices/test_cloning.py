"""Cloning a voice from a clip with the tiny offline cloner: the voice's parts, determinism, any format and rate,
the save/load round trip, the detokenizer speaking in it, and every bad clip named with its fix."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from fun_audio_chat.token2wav import CosyVoice3Voice
from fun_audio_chat.voices import VoiceCloner, VoiceCloningError

from .conftest import voiced_clip


def test_a_cloned_voice_has_aligned_codes_mel_and_an_embedding(tiny_cloner, tiny_detokenizer):
    voice = tiny_cloner.clone(voiced_clip(10.0), name="anna", sampling_rate=16000)
    assert voice.name == "anna"
    # 10 s: 250 codes at 25 Hz and 500 mel frames at 50 Hz (two per code), 80 bins; one 192-value embedding
    assert voice.prompt_codes.shape == (250,) and voice.prompt_codes.dtype == torch.int64
    assert voice.prompt_mel.shape == (500, 80) and voice.speaker_embedding.shape == (192,)
    voice.validate(tiny_detokenizer.config)


def test_cloning_is_deterministic_and_depends_on_the_speaker(tiny_cloner):
    clip = voiced_clip(4.0, pitch=120)
    first, again = tiny_cloner.clone(clip, sampling_rate=16000), tiny_cloner.clone(clip, sampling_rate=16000)
    assert torch.equal(first.speaker_embedding, again.speaker_embedding)
    assert torch.equal(first.prompt_codes, again.prompt_codes) and torch.equal(first.prompt_mel, again.prompt_mel)
    other = tiny_cloner.clone(voiced_clip(4.0, pitch=230, seed=1), sampling_rate=16000)
    assert not torch.allclose(first.speaker_embedding, other.speaker_embedding, atol=1e-3)
    assert not torch.equal(first.prompt_mel, other.prompt_mel)


def test_a_stereo_44k_flac_file_clones_like_the_same_samples_in_memory(tiny_cloner, tmp_path):
    clip = voiced_clip(4.0, 44100)
    path = tmp_path / "speaker one.flac"
    sf.write(path, np.stack([clip, clip], axis=1), 44100)  # 16-bit stereo FLAC at 44.1 kHz
    voice = tiny_cloner.clone(path)
    assert voice.name == "speaker one"  # the file's stem
    reference = tiny_cloner.clone(clip, sampling_rate=44100)
    assert voice.prompt_codes.shape == reference.prompt_codes.shape == (100,)
    # decoded, downmixed and resampled to 16 and 24 kHz: equal up to the file's 16-bit quantisation
    assert (voice.prompt_mel - reference.prompt_mel).abs().mean() < 0.01
    assert torch.allclose(voice.speaker_embedding, reference.speaker_embedding, atol=1e-2)


def test_save_and_load_keep_a_cloned_voice(tiny_cloner, tmp_path):
    voice = tiny_cloner.clone(voiced_clip(3.5), name="bea", sampling_rate=16000)
    voice.save(tmp_path / "bea.safetensors")
    loaded = CosyVoice3Voice.load(tmp_path / "bea.safetensors")
    assert loaded.name == "bea"
    for field in ("speaker_embedding", "prompt_codes", "prompt_mel"):
        assert torch.equal(getattr(loaded, field), getattr(voice, field))


def test_the_detokenizer_speaks_in_a_cloned_voice(tiny_cloner, tiny_detokenizer):
    anna = tiny_cloner.clone(voiced_clip(3.0, pitch=120), name="anna", sampling_rate=16000)
    bert = tiny_cloner.clone(voiced_clip(3.0, pitch=240, seed=2), name="bert", sampling_rate=16000)
    codes = torch.randint(0, 296, (30,), generator=torch.Generator().manual_seed(0))
    in_anna = tiny_detokenizer(codes, voice=anna)
    assert in_anna.shape == tiny_detokenizer(codes).shape == (30 * tiny_detokenizer.samples_per_token,)
    assert torch.equal(torch.as_tensor(in_anna), torch.as_tensor(tiny_detokenizer(codes, voice=anna)))
    assert not torch.allclose(torch.as_tensor(in_anna), torch.as_tensor(tiny_detokenizer(codes, voice=bert)))


@pytest.mark.parametrize(
    "clip, message",
    [
        (voiced_clip(2.0), r"2\.0 s long; a voice needs 3 to 30 s.*longer recording"),
        (voiced_clip(31.0), r"31\.0 s long; a voice takes at most 30 s.*Cut it"),
        (np.zeros(16000 * 5, dtype=np.float32), r"silent \(digital silence\)"),
        (voiced_clip(5.0) * 1e-4, r"silent \(its loudest sample is at -\d+ dBFS\)"),
        (b"this is a text file, not a recording", r"could not decode.*Pass a recording of one speaker"),
        (np.full(16000 * 5, np.nan, dtype=np.float32), r"NaN.*Pass a recording"),
    ],
    ids=["too-short", "too-long", "digital-silence", "near-silence", "not-audio", "nan"],
)
def test_bad_clips_are_refused_with_the_fix(tiny_cloner, clip, message):
    with pytest.raises(VoiceCloningError, match=message):
        tiny_cloner.clone(clip, sampling_rate=16000)


def test_a_missing_clip_file_is_named(tiny_cloner, tmp_path):
    with pytest.raises(VoiceCloningError, match="audio file not found"):
        tiny_cloner.clone(tmp_path / "nobody.wav")


def test_codes_outside_the_detokenizer_vocabulary_are_refused(tiny_cloner):
    cloner = VoiceCloner(lambda audio, sampling_rate: [[5, 7000]], tiny_cloner.speaker_encoder, num_codes=296)
    with pytest.raises(VoiceCloningError, match=r"outside the detokenizer's \[0, 296\).*same CosyVoice 3 release"):
        cloner.clone(voiced_clip(3.0), sampling_rate=16000)


def test_from_pretrained_names_what_a_folder_lacks(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        VoiceCloner.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no campplus.onnx"):
        VoiceCloner.from_pretrained(tmp_path)
    pytest.importorskip("onnxruntime")
    from fun_audio_chat.voices import tiny_speaker_encoder_model

    (tmp_path / "campplus.onnx").write_bytes(tiny_speaker_encoder_model())
    with pytest.raises(FileNotFoundError, match="no speech_tokenizer_v3.onnx"):
        VoiceCloner.from_pretrained(tmp_path)
    cloner = VoiceCloner.from_pretrained(tmp_path, speech_tokenizer=lambda audio, sampling_rate: [[1, 2] * 40])
    voice = cloner.clone(voiced_clip(3.0), sampling_rate=16000)
    # 80 codes but 150 mel frames (3 s): both cut to 75 codes and 150 frames, as CosyVoice's frontend cuts them
    assert voice.prompt_codes.tolist() == ([1, 2] * 40)[:75] and voice.prompt_mel.shape == (150, 80)


def test_a_speaker_encoder_that_is_not_campplus_is_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from fun_audio_chat.voices import OnnxSpeakerEncoder

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["fbank"], ["pooled"], keepdims=0)],
        "wrong_width",
        [helper.make_tensor_value_info("fbank", TensorProto.FLOAT, [1, "frames", 80])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    encoder = OnnxSpeakerEncoder(model.SerializeToString())
    with pytest.raises(ValueError, match="gave 1 values.*192-value CAM\\+\\+ embedding"):
        encoder(voiced_clip(1.0))
    (tmp_path / "campplus.onnx").write_text("not onnx")
    with pytest.raises(ValueError, match="not a usable ONNX speaker encoder"):
        OnnxSpeakerEncoder(tmp_path)
