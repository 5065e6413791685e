"""Audio input forms, resampling, validation errors and whole-clip features."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from fun_audio_chat.processing import AudioInputError, load_audio, resample

from .conftest import noise, tone

PROMPT = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n"


def _features(processor, audio, **kwargs):
    out = processor(text=PROMPT, audio=audio, return_tensors="np", **kwargs)
    return out["input_features"], out["feature_attention_mask"], out["input_ids"]


def _int16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


class _FakeDecoder:
    """Duck-typed stand-in for the torchcodec AudioDecoder that datasets.Audio returns when torchcodec is installed."""

    def __init__(self, data, rate):
        self._samples = type("Samples", (), {"data": torch.from_numpy(data), "sample_rate": rate})()

    def get_all_samples(self):
        return self._samples


def test_every_input_form_gives_identical_features(processor, tmp_path):
    pcm = _int16(noise(24000, seed=1, scale=0.2))  # 1.5 s of 16-bit audio
    as_float = pcm.astype(np.float32) / 32768.0
    wav_path = tmp_path / "clip.wav"
    flac_path = tmp_path / "clip.flac"
    sf.write(wav_path, pcm, 16000, subtype="PCM_16")
    sf.write(flac_path, pcm, 16000, subtype="PCM_16")
    wav_bytes = wav_path.read_bytes()
    reference, reference_mask, reference_ids = _features(processor, as_float, sampling_rate=16000)
    assert reference_mask.sum() == math.ceil(24000 / 160)

    forms = {
        "path str": str(wav_path),
        "pathlib": wav_path,
        "flac path": str(flac_path),
        "bytes": wav_bytes,
        "bytearray": bytearray(wav_bytes),
        "int16 array": (pcm, 16000),
        "torch tensor": (torch.from_numpy(as_float), 16000),
        "float64 list": (as_float.astype(np.float64).tolist(), 16000),
        "datasets decoded": {"array": as_float, "sampling_rate": 16000},
        "datasets path": {"path": str(wav_path), "bytes": None},
        "datasets bytes": {"path": "clip.wav", "bytes": wav_bytes},
        "decoder object (torchcodec-style)": _FakeDecoder(np.stack([as_float, as_float]), 16000),
        "stereo (channels, time)": (np.stack([as_float, as_float]), 16000),
        "stereo (time, channels)": (np.stack([as_float, as_float], axis=1), 16000),
    }
    for name, audio in forms.items():
        feats, mask, ids = _features(processor, audio)
        np.testing.assert_array_equal(mask, reference_mask, err_msg=name)
        np.testing.assert_array_equal(ids, reference_ids, err_msg=name)
        np.testing.assert_allclose(feats, reference, atol=1e-5, rtol=0, err_msg=name)


def test_chat_content_keys_path_url_audio(processor, tmp_path):
    clip = noise(16000, seed=2)
    path = tmp_path / "c.wav"
    sf.write(path, clip, 16000, subtype="FLOAT")
    outs = []
    for item in (
        {"type": "audio", "path": str(path)},
        {"type": "audio", "url": str(path)},
        {"type": "audio", "audio": clip, "sampling_rate": 16000},
        {"type": "audio", "audio": {"array": clip, "sampling_rate": 16000}},
    ):
        conversation = [{"role": "user", "content": [item]}]
        outs.append(
            processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
            )
        )
    for out in outs[1:]:
        np.testing.assert_array_equal(out["input_ids"], outs[0]["input_ids"])
        np.testing.assert_allclose(out["input_features"], outs[0]["input_features"], atol=1e-6)


def test_ogg_vorbis_file_loads(tmp_path):
    clip = tone(1.0, 16000, freq=300.0)
    path = tmp_path / "t.ogg"
    sf.write(path, clip, 16000, format="OGG", subtype="VORBIS")
    loaded = load_audio(str(path))
    assert abs(len(loaded) - 16000) < 200  # vorbis may add a few padding samples
    # lossy, but still the same tone
    n = min(len(loaded), len(clip))
    corr = np.corrcoef(loaded[:n], clip[:n])[0, 1]
    assert corr > 0.95


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_to_16k_matches_the_tone(rate):
    seconds, freq = 1.0, 440.0
    source = tone(seconds, rate, freq)
    out = load_audio((source, rate))
    assert len(out) == round(seconds * 16000)
    expected = tone(seconds, 16000, freq)
    interior = slice(800, len(out) - 800)  # resampler edge transients
    assert np.max(np.abs(out[interior] - expected[interior])) < 5e-3
    assert resample(source, rate, 16000).dtype == np.float32


def test_resample_is_soxr():
    import soxr

    x = tone(0.5, 44100)
    np.testing.assert_array_equal(
        resample(x, 44100, 16000), soxr.resample(x, 44100, 16000, quality="HQ").astype(np.float32)
    )


def test_int16_scaling_and_downmix():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    out = load_audio(pcm, sampling_rate=16000)
    np.testing.assert_allclose(out, [0.0, 0.5, -1.0, 32767 / 32768], atol=1e-7)
    stereo = np.array([[1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, -0.5]], dtype=np.float32)
    np.testing.assert_allclose(load_audio(stereo, sampling_rate=16000), [0.5, 0.5, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------- errors
def test_error_empty_audio(processor):
    with pytest.raises(AudioInputError, match=r"audio 0: audio is empty \(0 samples\)"):
        processor(text=PROMPT, audio=np.zeros(0, dtype=np.float32), sampling_rate=16000)
    with pytest.raises(AudioInputError, match="audio bytes are empty"):
        processor(text=PROMPT, audio=b"")


def test_error_too_short_audio(processor):
    with pytest.raises(AudioInputError, match="too short .*at least 40 ms"):
        processor(text=PROMPT, audio=np.ones(300, dtype=np.float32) * 0.1, sampling_rate=16000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_nan_or_inf(processor, bad):
    clip = noise(16000)
    clip[100] = bad
    with pytest.raises(AudioInputError, match="1 NaN or infinite sample"):
        processor(text=PROMPT, audio=clip, sampling_rate=16000)


def test_error_unknown_sampling_rate(processor):
    # processor(audio=bare array) takes it at 16 kHz (the official convention); everywhere else a bare array's
    # rate is unknown and refused
    with pytest.raises(AudioInputError, match="sampling rate of a raw audio array is unknown"):
        load_audio(noise(16000))
    with pytest.raises(AudioInputError, match='has an "array" but no "sampling_rate"'):
        load_audio({"array": noise(100)})
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": noise(16000)}]}]
    with pytest.raises(AudioInputError, match="sampling rate .* unknown"):
        processor.apply_chat_template(conversation, tokenize=True, return_dict=True)


def test_error_missing_and_unreadable_files(processor, tmp_path):
    with pytest.raises(AudioInputError, match="audio file not found: .*nope.wav"):
        processor(text=PROMPT, audio=str(tmp_path / "nope.wav"))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioInputError, match="could not decode audio file .*junk.wav"):
        processor(text=PROMPT, audio=str(junk))
    with pytest.raises(AudioInputError, match="could not decode .* bytes of audio"):
        load_audio(b"RIFF\x00\x00garbage")
    with pytest.raises(AudioInputError, match="is a directory"):
        load_audio(str(tmp_path))
    with pytest.raises(AudioInputError, match='needs "array" \\+ "sampling_rate", "bytes" or "path"'):
        load_audio({"foo": 1})


def test_error_audio_count_mismatch(processor):
    clip = noise(16000)
    with pytest.raises(ValueError, match=r"Found 1 <\|AUDIO\|> placeholder\(s\) .* but 2 audio input\(s\)"):
        processor(text=PROMPT, audio=[clip, clip], sampling_rate=16000)
    with pytest.raises(ValueError, match=r"Found 2 <\|AUDIO\|> placeholder\(s\) .* but 1 audio input\(s\)"):
        processor(text=PROMPT + PROMPT, audio=[clip], sampling_rate=16000)
    with pytest.raises(ValueError, match=r"Found 1 <\|AUDIO\|> placeholder\(s\) .* but 0 audio"):
        processor(text=PROMPT)


def test_error_audio_longer_than_context(processor):
    seconds = processor.max_audio_seconds + 1
    long_clip = np.zeros(int(seconds * 16000), dtype=np.float32)
    long_clip[::100] = 0.1
    with pytest.raises(
        AudioInputError,
        match=r"audio 0: audio lasts 410\.6 s and needs 2053 LLM positions, longer than the model context",
    ):
        processor(text=PROMPT, audio=long_clip, sampling_rate=16000)
    processor.max_audio_seconds = 2.0
    with pytest.raises(AudioInputError, match=r"max_audio_seconds=2 s"):
        processor(text=PROMPT, audio=noise(16000 * 3), sampling_rate=16000)


# ------------------------------------------------------------------------------------------------- features
def test_long_audio_is_not_truncated(processor):
    num_samples = 45 * 16000 + 123  # longer than Whisper's 30 s window
    clip = noise(num_samples, seed=5)
    out = processor(text=PROMPT, audio=clip, sampling_rate=16000, return_tensors="np")
    frames = math.ceil(num_samples / 160)
    assert out["input_features"].shape == (1, 128, frames)
    assert out["feature_attention_mask"].sum() == frames > 3000
    tail = out["input_features"][0, :, 3000:]
    assert np.abs(tail - tail.mean()).max() > 0.1  # real signal after 30 s, not padding
    n = math.ceil(int(num_samples / 16000 * 25) / 5)
    assert (out["input_ids"][0] == processor.audio_token_id).sum() == n == 225
    assert out["speech_attention_mask"].sum() == int(num_samples / 16000 * 25)


def test_features_equal_official_30s_window_on_valid_frames(processor):
    """For clips up to 30 s our features are WhisperFeatureExtractor's padded-to-30 s output (the official
    processor): every frame of the window, the valid ones marked by the mask."""
    for num_samples in (27700, 41000, 16000 * 12 + 7):
        clip = noise(num_samples, seed=num_samples)
        ours = processor(text=PROMPT, audio=clip, sampling_rate=16000, return_tensors="np")
        official = processor.feature_extractor(
            clip, sampling_rate=16000, return_attention_mask=True, return_tensors="np"
        )
        valid = int(official["attention_mask"].sum())
        assert valid == int(ours["feature_attention_mask"].sum()) == math.ceil(num_samples / 160)
        np.testing.assert_allclose(ours["input_features"][0], official["input_features"][0], atol=2e-5)


def test_features_do_not_depend_on_the_batch(processor):
    short, long = noise(20000, seed=1), noise(52000, seed=2)
    alone = processor(text=PROMPT, audio=short, sampling_rate=16000, return_tensors="np")
    both = processor(text=[PROMPT, PROMPT], audio=[long, short], sampling_rate=16000, return_tensors="np")
    np.testing.assert_allclose(both["input_features"][1], alone["input_features"][0], atol=1e-6)
    np.testing.assert_array_equal(both["feature_attention_mask"][1], alone["feature_attention_mask"][0])
    # Training batches (padding to the longest clip) hold the same valid frames, zeros after them.
    compact = processor.extract_features([long, short])
    valid = int(alone["feature_attention_mask"].sum())
    np.testing.assert_allclose(
        compact["input_features"][1, :, :valid], alone["input_features"][0, :, :valid], atol=1e-6
    )
    assert (compact["input_features"][1, :, valid:] == 0).all()


def test_wav_bytes_from_io(processor):
    buffer = io.BytesIO()
    clip = noise(8000, seed=4)
    sf.write(buffer, clip, 8000, format="WAV", subtype="FLOAT")
    out = load_audio(buffer.getvalue())
    assert len(out) == 16000


def test_bundled_example_clip(processor):
    from fun_audio_chat.processing import EXAMPLE_AUDIO_TEXT, example_audio_path

    path = example_audio_path()
    info = sf.info(path)
    assert (info.samplerate, info.channels) == (16000, 1)
    assert 1.0 < info.duration < 6.0 and EXAMPLE_AUDIO_TEXT
    assert __import__("os").path.getsize(path) < 200_000
    out = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "path": path}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert out["feature_attention_mask"].sum() == math.ceil(info.frames / 160)
