"""CosyVoice3Voice: construction, validation, safetensors round trip, and the detokenizer's ``voice=`` keywords."""

from __future__ import annotations

import pytest
import torch

from fun_audio_chat.token2wav import CosyVoice3Voice, align_prompt

TINY_VOCAB = 296  # the tiny built-in detokenizer's codes


def random_voice(name="test", prompt_tokens=12, seed=0, vocab=TINY_VOCAB) -> CosyVoice3Voice:
    generator = torch.Generator().manual_seed(seed)
    return CosyVoice3Voice(
        name=name,
        speaker_embedding=torch.randn(192, generator=generator),
        prompt_codes=torch.randint(0, vocab, (prompt_tokens,), generator=generator),
        prompt_mel=torch.randn(2 * prompt_tokens, 80, generator=generator) * 2 - 5,
    )


def codes(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_save_load_round_trip_keeps_name_and_tensors(tmp_path):
    voice = random_voice("中文女")
    path = tmp_path / "voice.safetensors"
    voice.save(path)
    loaded = CosyVoice3Voice.load(path)
    assert loaded.name == "中文女"
    assert torch.equal(loaded.speaker_embedding, voice.speaker_embedding)
    assert torch.equal(loaded.prompt_codes, voice.prompt_codes) and loaded.prompt_codes.dtype == torch.int64
    assert torch.equal(loaded.prompt_mel, voice.prompt_mel) and loaded.prompt_mel.dtype == torch.float32


def test_embedding_only_voice_round_trips(tmp_path):
    voice = CosyVoice3Voice.from_speaker_embedding("plain", torch.randn(1, 192))
    assert not voice.has_prompt and voice.speaker_embedding.shape == (192,)
    voice.save(tmp_path / "plain.safetensors")
    loaded = CosyVoice3Voice.load(tmp_path / "plain.safetensors")
    assert not loaded.has_prompt and loaded.prompt_mel.shape[0] == 0


def test_official_layouts_are_accepted():
    voice = CosyVoice3Voice(
        "official", torch.randn(1, 192), torch.randint(0, 6561, (1, 5), dtype=torch.int32), torch.randn(1, 10, 80)
    )
    assert voice.prompt_codes.shape == (5,) and voice.prompt_mel.shape == (10, 80)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(speaker_embedding=torch.randn(80)), "192-value CAM\\+\\+ embedding"),
        (dict(prompt_codes=torch.tensor([1, 2, TINY_VOCAB])), rf"speech codes in \[0, {TINY_VOCAB}\)"),
        (dict(prompt_codes=torch.tensor([1, 2, -1])), rf"speech codes in \[0, {TINY_VOCAB}\)"),
        (dict(prompt_mel=torch.randn(5, 80)), "need 6 prompt mel frames.*align_prompt"),
        (dict(prompt_mel=torch.randn(6, 40)), "40 mel bins"),
        (
            dict(prompt_codes=torch.zeros(7000, dtype=torch.long), prompt_mel=torch.zeros(14000, 80)),
            "prompt clip of at most 30 s",
        ),
    ],
)
def test_validate_names_the_problem(tiny, change, message):
    fields = dict(
        speaker_embedding=torch.randn(192), prompt_codes=torch.tensor([1, 2, 3]), prompt_mel=torch.randn(6, 80)
    )
    fields.update(change)
    voice = CosyVoice3Voice("bad", **fields)
    with pytest.raises(ValueError, match=message):
        voice.validate(tiny.config)
    with pytest.raises(ValueError, match=message):  # the detokenizer checks every voice it is given
        tiny(codes(10, 0), voice=voice)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(speaker_embedding=torch.randn(2, 192)), "one vector"),
        (dict(speaker_embedding=torch.randn(192), prompt_codes=torch.rand(4)), "integer speech codes"),
        (dict(speaker_embedding=torch.randn(192), prompt_mel=torch.randn(80)), r"\(frames, mel_bins\)"),
        (dict(speaker_embedding=torch.full((192,), float("nan"))), "finite"),
    ],
)
def test_malformed_voices_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        CosyVoice3Voice("bad", **fields)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a voice"):
        CosyVoice3Voice.load(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a voice file"):
        CosyVoice3Voice.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        CosyVoice3Voice.load(tmp_path / "missing.safetensors")


def test_align_prompt_cuts_like_the_official_frontend():
    aligned_codes, aligned_mel = align_prompt(torch.arange(10), torch.randn(17, 80))
    assert aligned_codes.shape == (8,) and aligned_mel.shape == (16, 80)
    aligned_codes, aligned_mel = align_prompt(torch.arange(5), torch.randn(17, 80))
    assert aligned_codes.shape == (5,) and aligned_mel.shape == (10, 80)


def test_embedding_only_voice_equals_speaker_embedding_everywhere(tiny):
    embedding = torch.randn(192, generator=torch.Generator().manual_seed(7))
    voice = CosyVoice3Voice.from_speaker_embedding("seven", embedding)
    reply = codes(40, 1)
    assert torch.equal(tiny(reply, voice=voice), tiny(reply, speaker_embedding=embedding))
    by_voice = tiny.streaming_session(voice=voice)
    by_embedding = tiny.streaming_session(embedding)
    assert torch.equal(by_voice.push(reply), by_embedding.push(reply))
    assert torch.equal(by_voice.finish(), by_embedding.finish())


def test_voice_and_speaker_embedding_are_exclusive(tiny):
    voice = CosyVoice3Voice.from_speaker_embedding("x", torch.randn(192))
    with pytest.raises(ValueError, match="either voice= or speaker_embedding="):
        tiny(codes(10, 0), speaker_embedding=torch.randn(192), voice=voice)
    with pytest.raises(ValueError, match="either voice= or speaker_embedding="):
        tiny.streaming_session(torch.randn(192), voice=voice)
    with pytest.raises(TypeError, match="CosyVoice3Voice"):
        tiny(codes(10, 0), voice=torch.randn(192))


def test_render_rows_takes_one_voice_per_row(tiny):
    voices = [random_voice("a", 0, seed=1), None, random_voice("c", 0, seed=3)]
    rows = [codes(30, 1), codes(22, 2), codes(30, 3)]
    together = tiny.render_rows(rows, voices=voices)
    for row, voice, wave in zip(rows, voices, together):
        assert torch.allclose(wave, tiny(row, voice=voice), atol=1e-5)
    with pytest.raises(ValueError, match="one voice"):
        tiny.render_rows(rows, voices=voices[:2])


def test_rows_with_different_prompts_in_one_batch_equal_their_solo_runs(tiny):
    voices = [random_voice("a", 12, seed=1), random_voice("b", 31, seed=2), None, random_voice("d", 5, seed=4)]
    rows = [codes(20, 1), codes(33, 2), codes(12, 3), codes(20, 4)]
    together = tiny.render_rows(rows, voices=voices)
    for row, voice, wave in zip(rows, voices, together):
        solo = tiny(row, voice=voice)
        assert wave.shape == solo.shape == (len(row) * 960,)
        torch.testing.assert_close(wave, solo, atol=1e-4, rtol=0)
    # each prompt changes its row
    assert not torch.allclose(together[0], tiny(rows[0], speaker_embedding=voices[0].speaker_embedding), atol=1e-3)


@pytest.mark.parametrize("chunked", [False, True], ids=["full-attention", "chunk-causal"])
def test_push_streams_sessions_with_different_voices_equal_their_solo_streams(tiny, chunked):
    voices = {"a": random_voice("a", 12, seed=1), "b": random_voice("b", 31, seed=2), "c": None}
    replies = {"a": codes(45, 5), "b": codes(35, 6), "c": codes(20, 7)}

    def solo(name):
        session = tiny.streaming_session(voice=voices[name], chunked=chunked)
        pieces = [session.push(replies[name][i : i + 10]) for i in range(0, len(replies[name]), 10)]
        return torch.cat(pieces + [session.finish()])

    sessions = {name: tiny.streaming_session(voice=voices[name], chunked=chunked) for name in replies}
    streamed = {name: [] for name in replies}
    for start in range(0, 45, 10):
        entries = [
            (sessions[name], reply[start : start + 10], start + 10 >= len(reply))
            for name, reply in replies.items()
            if start < len(reply)
        ]
        for (session, *_), audio in zip(entries, tiny.push_streams(entries)):
            streamed[next(name for name in sessions if sessions[name] is session)].append(audio)
    for name in replies:
        torch.testing.assert_close(torch.cat(streamed[name]), solo(name), atol=1e-4, rtol=0)


def test_chunked_voice_session_past_the_window_trim_equals_recomputing():
    """After the code window is trimmed the cached stream restarts from the voice's prompt cache: still equal to
    the official recompute-everything calls (prompt + window each call)."""
    from fun_audio_chat.tiny import tiny_detokenizer

    det = tiny_detokenizer()
    det.config.max_stream_tokens = 50  # trim early so a short reply crosses it
    voice = random_voice("a", 30, seed=1)  # first hop 25 + 20 codes of pad
    reply = codes(100, 8)
    outs = []
    for use_cache in (False, True):
        session = det.streaming_session(voice=voice, chunked=True, use_cache=use_cache)
        pieces = [session.push(reply[i : i + 9]) for i in range(0, len(reply), 9)]
        outs.append(torch.cat(pieces + [session.finish()]))
        assert session.trimmed_tokens == 50
    assert outs[1].shape == (100 * 960,)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)
