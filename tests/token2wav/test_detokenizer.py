"""The public detokenizer API on the tiny random model: shapes, batching (each row equals its solo result),
streaming sessions, the cached chunk-causal stream against the official chunked schedule, persistence, errors."""

from __future__ import annotations

import pytest
import torch

from fun_audio_chat import CosyVoice3Detokenizer
from fun_audio_chat.tiny import TINY_SPEECH_CODES, tiny_detokenizer


def codes(n: int, seed: int = 0) -> torch.Tensor:
    """Real codes of the tiny layout (the tiny detokenizer knows no others; the official fixture knows more)."""
    return torch.randint(0, TINY_SPEECH_CODES, (n,), generator=torch.Generator().manual_seed(seed))


def test_offline_shapes_and_types(tiny):
    assert tiny.sample_rate == 24000 and tiny.sampling_rate == 24000
    wave = tiny(codes(40))
    assert isinstance(wave, torch.Tensor) and wave.dtype == torch.float32 and wave.shape == (40 * 960,)
    assert wave.abs().max() > 0 and wave.abs().max() <= 0.99
    assert torch.equal(tiny(codes(40).tolist()), wave)  # a list of ints is the same input
    assert tiny([]).shape == (0,)


def test_tiny_detokenizer_is_deterministic_per_seed():
    a, b, c = tiny_detokenizer(0), tiny_detokenizer(0), tiny_detokenizer(1)
    assert torch.equal(a(codes(12)), b(codes(12)))
    assert not torch.equal(a(codes(12)), c(codes(12)))


def test_batched_rows_equal_solo_rows(tiny):
    rows = [codes(37, 1), codes(100, 2), codes(5, 3), codes(100, 4)]
    batched = tiny(rows)
    assert isinstance(batched, list) and len(batched) == 4
    for row, wave in zip(rows, batched):
        solo = tiny(row)
        assert wave.shape == solo.shape
        torch.testing.assert_close(wave, solo, atol=1e-4, rtol=0)
    # a 2-D tensor is a batch too
    stacked = tiny(torch.stack([rows[1], rows[3]]))
    torch.testing.assert_close(stacked[1], batched[3], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_long_rows_are_segmented_and_batched_like_solo(tiny):
    rows = [codes(790, 5), codes(60, 6)]  # 790 = 750 + 40 → merged and halved: 395 + 395
    batched = tiny(rows)
    for row, wave in zip(rows, batched):
        torch.testing.assert_close(wave, tiny(row), atol=1e-4, rtol=0)
    first, second = tiny(rows[0][:395]), tiny(rows[0][395:])
    # the two equal-length segments share one vocoder batch (the official batched vocoder differs by 1.2e-5 too)
    torch.testing.assert_close(batched[0], torch.cat([first, second]), atol=1e-4, rtol=0)


def test_speaker_embedding_changes_the_voice(tiny):
    other = torch.randn(1, 192, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(tiny(codes(20)), tiny(codes(20), speaker_embedding=other))
    with pytest.raises(ValueError, match="speaker_embedding must have 192 values"):
        tiny(codes(20), speaker_embedding=torch.ones(10))


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, 2, TINY_SPEECH_CODES], r"speech codes must be in \[0, 296\)"),  # a speech-BOS id is not a sound
        ([1, -1], r"speech codes must be in"),
        (torch.ones(2, 2, 2, dtype=torch.long), "codes must be 1-D"),
        (torch.ones(4), "must be integers"),
    ],
)
def test_bad_codes_give_clear_errors(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(bad)


def test_streaming_push_finish_covers_every_code(tiny):
    session = tiny.streaming_session()
    pieces = [session.push(codes(7, seed)) for seed in range(10)]  # 70 codes in uneven pushes
    tail = session.finish()
    total = torch.cat(pieces + [tail])
    assert total.shape == (70 * 960,)  # the tail the official sender drops is rendered too
    assert session.finish().numel() == 0
    with pytest.raises(RuntimeError, match="finished"):
        session.push([1])


def test_streaming_step_matches_official_call_semantics(tiny):
    session = tiny.streaming_session(use_cache=False)
    tokens = codes(40)
    first = session.step(tokens[:18], token_offset=0, finalize=False)
    assert first.shape == (10560,)  # 30 mel frames, 8 held back by the vocoder
    second = session.step(tokens[:33], token_offset=15, finalize=False)
    assert second.shape == (14400,)
    last = session.step(tokens, token_offset=30, finalize=True)
    assert first.numel() + second.numel() + last.numel() == 40 * 960
    with pytest.raises(ValueError, match="token_offset"):
        session.step(tokens[:5], token_offset=9)


def _chunked_stream(model, tokens, use_cache, pushes=1, hop_tokens=None):
    session = model.streaming_session(chunked=True, use_cache=use_cache, hop_tokens=hop_tokens)
    step = -(-len(tokens) // pushes)
    pieces = [session.push(tokens[i : i + step]) for i in range(0, len(tokens), step)]
    return torch.cat(pieces + [session.finish()]), session


def test_cached_chunked_stream_equals_the_official_chunked_schedule(official_model):
    """chunked=True: hop 25 + 3 with chunk-causal attention, every call recomputing (use_cache=False, the
    official per-call behaviour) vs the cached flow and windowed vocoder."""
    tokens = codes(110, 9)
    reference, _ = _chunked_stream(official_model, tokens, use_cache=False)
    calls = []
    hook = official_model.flow.estimator.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
    try:
        cached, session = _chunked_stream(official_model, tokens, use_cache=True, pushes=7)
    finally:
        hook.remove()
    assert cached.shape == reference.shape == (110 * 960,)
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)
    # the cache really is used: no Euler step sees more than one chunk plus the look-ahead frames
    assert max(calls) <= 50 + 2 * 25
    # and chunk-causal output differs from the full-attention stream
    full = official_model.streaming_session()
    assert not torch.allclose(torch.cat([full.push(tokens), full.finish()]), cached, atol=1e-3)


@pytest.mark.slow
def test_cached_stream_survives_the_token_window_trim(tiny):
    tokens = codes(260, 11)  # past the 200-code trim: the flow cache restarts like the official recompute
    reference, _ = _chunked_stream(tiny, tokens, use_cache=False)
    cached, session = _chunked_stream(tiny, tokens, use_cache=True, pushes=13)
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)
    assert session.trimmed_tokens == 200


@pytest.mark.slow
def test_windowed_vocoder_stream_equals_recompute(tiny):
    tokens = codes(120, 12)
    outs = []
    for use_cache in (False, True):
        session = tiny.streaming_session(use_cache=use_cache)
        outs.append(torch.cat([session.push(tokens), session.finish()]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tiny")
    loaded = CosyVoice3Detokenizer.from_pretrained(tmp_path / "tiny")
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # equal weights; the loaded tensors may sit at other memory alignments, which moves CPU kernels' last bits
    torch.testing.assert_close(loaded(codes(30)), tiny(codes(30)), atol=1e-6, rtol=0)


def test_bf16_flow_is_opt_in(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tiny")
    half = CosyVoice3Detokenizer.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    assert half.flow.estimator.input_projection.weight.dtype == torch.bfloat16
    assert half.hift.conv_post.bias.dtype == torch.float32
    wave = half(codes(20))
    assert wave.dtype == torch.float32 and wave.shape == (20 * 960,) and torch.isfinite(wave).all()


def test_numpy_inputs(tiny):
    import numpy as np

    rows = [np.arange(10, 30), np.arange(40, 52)]
    waves = tiny(rows)
    assert [w.shape[0] for w in waves] == [20 * 960, 12 * 960]
    torch.testing.assert_close(tiny(rows[1]), waves[1], atol=1e-5, rtol=0)


def test_cached_chunked_stream_with_a_short_hop_recomputes_partial_chunks(tiny):
    tokens = codes(70, 13)  # hop 15: calls end inside chunks, whose frames the next call recomputes
    reference, _ = _chunked_stream(tiny, tokens, use_cache=False, hop_tokens=15)
    cached, session = _chunked_stream(tiny, tokens, use_cache=True, pushes=5, hop_tokens=15)
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="hop_tokens must be positive"):
        tiny.streaming_session(hop_tokens=-1)
