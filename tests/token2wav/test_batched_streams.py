"""``push_streams``: many streaming sessions advanced together (one batched flow call and batched vocoder calls per
round) give each session the audio it gets alone."""

from __future__ import annotations

import pytest
import torch

VOCAB = 296  # the tiny detokenizer knows only the tiny model's real codes


def codes(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def detokenizer():
    from fun_audio_chat.tiny import tiny_detokenizer

    det = tiny_detokenizer()
    det.config.flow.vocab_size = VOCAB  # only affects the input check; the weights keep their rows
    return det


def solo(det, pieces: list[list[int]], speaker=None) -> list[torch.Tensor]:
    session = det.streaming_session(speaker)
    out = [session.push(piece) for piece in pieces]
    out.append(session.finish())
    return out


def test_staggered_sessions_equal_their_solo_streams(detokenizer, monkeypatch):
    """Three replies of different lengths whose codes arrive in groups of 5 at different ticks, one with its own
    voice, one finishing early: every tick's audio of every session equals its solo stream's."""
    voice = torch.randn(1, 192, generator=torch.Generator().manual_seed(3))
    replies = {"a": codes(95, 1), "b": codes(60, 2), "c": codes(130, 4)}
    starts = {"a": 0, "b": 4, "c": 9}  # tick at which each reply's first group arrives
    speakers = {"a": None, "b": voice, "c": None}
    flow_rows, vocoder_rows = [], []
    forward_rows, vocoder = detokenizer.flow.forward_rows, detokenizer.hift.forward
    monkeypatch.setattr(
        detokenizer.flow, "forward_rows", lambda rows, *a: flow_rows.append(len(rows)) or forward_rows(rows, *a)
    )
    monkeypatch.setattr(
        detokenizer.hift, "forward", lambda mel, **k: vocoder_rows.append(mel.shape[0]) or vocoder(mel, **k)
    )
    sessions = {name: detokenizer.streaming_session(speakers[name]) for name in replies}
    groups = {name: [reply[i : i + 5] for i in range(0, len(reply), 5)] for name, reply in replies.items()}
    streamed = {name: [] for name in replies}
    last_tick = max(starts[name] + len(groups[name]) for name in replies)
    for tick in range(last_tick):
        due = [name for name in replies if 0 <= tick - starts[name] < len(groups[name])]
        entries = []
        for name in due:
            index = tick - starts[name]
            entries.append((sessions[name], groups[name][index], index == len(groups[name]) - 1))
        for name, audio in zip(due, detokenizer.push_streams(entries)):
            streamed[name].append(audio)
    monkeypatch.undo()
    # the sessions really shared calls: all three in one flow batch, vocoder windows batched too
    assert max(flow_rows) == 3 and max(vocoder_rows) >= 2
    for name, reply in replies.items():
        expected = solo(detokenizer, groups[name], speakers[name])
        # the solo stream's finish() tail is part of the last push_streams entry (finish=True)
        expected = expected[:-2] + [torch.cat(expected[-2:])]
        got = streamed[name]
        assert [a.shape for a in got] == [e.shape for e in expected], name
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0)
        assert sessions[name].finished
        assert sum(a.numel() for a in got) == len(reply) * 960


def test_a_long_stream_past_the_window_trim_and_vocoder_restart(detokenizer):
    """Past the 200-code trim and the 500-code vocoder restart, batched rounds still equal the solo stream."""
    long_reply, short_reply = codes(540, 7), codes(40, 8)
    together = [detokenizer.streaming_session(), detokenizer.streaming_session()]
    outs = [[], []]
    for start in range(0, 540, 45):
        entries = [(together[0], long_reply[start : start + 45], start + 45 >= 540)]
        if start < 40:
            entries.append((together[1], short_reply[start : start + 45], True))
        for row, audio in enumerate(detokenizer.push_streams(entries)):
            outs[row].append(audio)
    alone = solo(detokenizer, [long_reply[s : s + 45] for s in range(0, 540, 45)])
    torch.testing.assert_close(torch.cat(outs[0]), torch.cat(alone), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(outs[1]), torch.cat(solo(detokenizer, [short_reply])), atol=1e-4, rtol=0)


def test_sessions_that_cannot_share_a_batch_still_run(detokenizer):
    chunked = detokenizer.streaming_session(chunked=True)
    plain = detokenizer.streaming_session()
    reply = codes(70, 9)
    got = detokenizer.push_streams([(chunked, reply, True), (plain, reply, True)])
    reference = detokenizer.streaming_session(chunked=True)
    torch.testing.assert_close(got[0], torch.cat([reference.push(reply), reference.finish()]), atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], torch.cat(solo(detokenizer, [reply])), atol=1e-4, rtol=0)


def test_bad_entries_are_refused(detokenizer):
    session = detokenizer.streaming_session()
    with pytest.raises(ValueError, match="appear once"):
        detokenizer.push_streams([(session, [1], False), (session, [2], False)])
    with pytest.raises(ValueError, match=r"speech codes must be in \[0, 296\)"):
        detokenizer.push_streams([(detokenizer.streaming_session(), [296], False)])
    finished = detokenizer.streaming_session()
    detokenizer.push_streams([(finished, codes(10, 1), True)])
    with pytest.raises(RuntimeError, match="finished"):
        detokenizer.push_streams([(finished, [1], False)])
