"""S3Tokenizer wrapper: torchaudio-free import, 25 Hz codes, batched == single, loading, long-audio segmentation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fun_audio_chat.processing import speech_tokenizer as st

from .conftest import noise, tone

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("s3tokenizer") is None, reason="s3tokenizer not installed"
)


@pytest.fixture(scope="module")
def s3_v3():
    """The real CosyVoice 3 architecture (S3TokenizerV3, fresh ModelConfigV3, 242 M params) with random weights."""
    return st.S3SpeechTokenizer.random(seed=0)


@pytest.fixture(scope="module")
def s3_small():
    """A 1-layer v3 tokenizer (head dim 64, as v3's rotary table needs) for fast plumbing tests."""
    st.import_s3tokenizer()  # s3tokenizer's own import needs the torchaudio work-around, whatever ran before
    from s3tokenizer.model_v3 import ModelConfigV3

    return st.S3SpeechTokenizer.random(seed=0, config=ModelConfigV3(n_audio_state=128, n_audio_head=2, n_audio_layer=1))


def test_import_without_torchaudio_leaves_no_stub():
    module = st.import_s3tokenizer()
    assert module.__name__ == "s3tokenizer"
    stub = sys.modules.get("torchaudio")
    assert stub is None or not getattr(stub, "__fun_audio_chat_stub__", False)
    # s3tokenizer's own file loader reports that torchaudio is unavailable instead of crashing obscurely
    if getattr(module.utils.torchaudio, "__fun_audio_chat_stub__", False):
        with pytest.raises(RuntimeError, match="torchaudio is not available"):
            module.load_audio("x.wav")


def test_missing_package_gives_install_hint(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "s3tokenizer", raising=False)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "s3tokenizer" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps s3tokenizer==0\.3\.0"):
        st.import_s3tokenizer()


@pytest.mark.slow
def test_v3_codes_rate_range_and_batch_equals_single(s3_v3):
    clips = [noise(16000 * 4, seed=1), tone(2.0) + noise(32000, seed=2), noise(16000 * 3 + 800, seed=3)]
    batched = s3_v3(clips)
    assert [len(c) for c in batched] == [100, 50, 77]  # 25 codes per second
    for codes in batched:
        assert all(0 <= c < 6561 for c in codes)
    assert len({c for codes in batched for c in codes}) > 5  # not a constant output
    singles = [s3_v3(clip)[0] for clip in clips]
    assert singles == batched
    assert s3_v3.num_codes == 6561 and s3_v3.n_mels == 128


def test_resampled_and_file_inputs(s3_small, tmp_path):
    import soundfile as sf

    clip = noise(16000 * 2, seed=4)
    path = tmp_path / "a.wav"
    sf.write(path, clip, 16000, subtype="FLOAT")
    from_file = s3_small([str(path)])[0]
    assert from_file == s3_small(clip)[0]
    assert len(s3_small((tone(1.0, 48000), 48000))[0]) == 25


def test_long_audio_official_segmentation(s3_small):
    # 30 s hard segments; a last piece under 1 s is merged with the previous one and the pair split in half
    pieces = s3_small._segments(np.zeros(16000 * 60 + 8000, dtype=np.float32))
    assert [len(p) for p in pieces] == [480000, 244000, 244000]
    pieces = s3_small._segments(np.zeros(16000 * 65, dtype=np.float32))
    assert [len(p) for p in pieces] == [480000, 480000, 80000]
    assert len(s3_small._segments(np.zeros(16000 * 30, dtype=np.float32))) == 1
    codes = s3_small(noise(16000 * 31, seed=5))[0]
    assert len(codes) == 775


def test_save_and_load_state_dict(s3_small, tmp_path):
    import torch
    from s3tokenizer.model_v3 import ModelConfigV3

    small = ModelConfigV3(n_audio_state=128, n_audio_head=2, n_audio_layer=1)
    clip = noise(16000, seed=6)
    path = tmp_path / "speech_tokenizer_v3_small.pt"
    torch.save(s3_small.model.state_dict(), path)
    assert st.S3SpeechTokenizer.from_pretrained(str(path), config=small)(clip) == s3_small(clip)
    from safetensors.torch import save_file

    path = tmp_path / "speech_tokenizer_v3_small.safetensors"
    save_file({k: v.contiguous() for k, v in s3_small.model.state_dict().items()}, str(path))
    assert st.S3SpeechTokenizer.from_pretrained(str(path), config=small)(clip) == s3_small(clip)
    # a state dict of another size is refused loudly
    other = ModelConfigV3(n_audio_state=128, n_audio_head=2, n_audio_layer=2)
    with pytest.raises(RuntimeError, match="Missing key"):
        st.S3SpeechTokenizer.from_pretrained(str(path), config=other)


def test_unknown_name_and_offline_download_errors():
    with pytest.raises(FileNotFoundError, match="neither a file nor an s3tokenizer model name"):
        st.S3SpeechTokenizer.from_pretrained("/nonexistent/tokenizer.onnx")


def test_reply_audio_tokenized_for_training(processor, s3_small):
    """An assistant reply given as audio is turned into codes by the speech tokenizer (with the 10-code delay)."""
    reply = noise(16000, seed=7)
    example = processor.build_training_example(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "hello"},
                    {"type": "audio", "audio": reply, "sampling_rate": 16000},
                ],
            },
        ],
        speech_tokenizer=lambda audios: [[c % 296 for c in codes] for codes in s3_small(audios)],
    )
    assert example["speech_ids"][0][:10] == [296] * 10
    assert len(example["speech_ids"][0]) == 10 + 25
