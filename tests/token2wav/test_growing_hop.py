"""``streaming_session(hop_growth=...)``: the first audio as early as the official fixed hop, fewer and longer
later calls (less recompute), the same total audio, chunked streams still equal to the chunk-causal flow over the
whole reply, and equal audio whether a session runs alone or in ``push_streams``."""

from __future__ import annotations

import pytest
import torch

from .test_batched_streams import codes, detokenizer, solo  # noqa: F401 - the module fixture

FRAME = 960  # samples per code at 24 kHz


def _calls(det, session, reply, group=5):
    """Feed ``reply`` in groups; returns (codes received when each piece of audio came, the audio pieces)."""
    seen, pieces, received = [], [], 0
    for start in range(0, len(reply), group):
        audio = session.push(reply[start : start + group])
        received += len(reply[start : start + group])
        if audio.numel():
            seen.append(received)
            pieces.append(audio)
    pieces.append(session.finish())
    return seen, pieces


def test_a_growing_hop_speaks_as_early_and_calls_less_often(detokenizer):  # noqa: F811
    reply = codes(190, 11)
    fixed_seen, fixed = _calls(detokenizer, detokenizer.streaming_session(), reply)
    grown_seen, grown = _calls(detokenizer, detokenizer.streaming_session(hop_growth=2), reply)
    assert fixed_seen[0] == grown_seen[0] == 20  # the first call is due at 15 + 3 codes: the group bringing the 18th
    # hops 15, 30, 60, 100 codes: the calls are due after 18, 48, 108 and 208 (never: the reply ends first) codes
    assert grown_seen == [20, 50, 110] and len(fixed_seen) == 12
    assert sum(p.numel() for p in grown) == sum(p.numel() for p in fixed) == len(reply) * FRAME
    # the first piece is the same call on the same codes
    torch.testing.assert_close(grown[0], fixed[0], atol=1e-6, rtol=0)


def test_a_chunked_stream_with_a_growing_hop_still_equals_the_chunk_causal_flow(detokenizer):  # noqa: F811
    reply = codes(160, 12)
    _, fixed = _calls(detokenizer, detokenizer.streaming_session(chunked=True), reply)
    seen, grown = _calls(detokenizer, detokenizer.streaming_session(chunked=True, hop_growth=2), reply)
    assert seen == [30, 80]  # hops of 25 and 50 codes (+ 3 look-ahead), then 100 > what is left
    torch.testing.assert_close(torch.cat(grown), torch.cat(fixed), atol=1e-4, rtol=0)


def test_push_streams_gives_a_growing_hop_session_its_solo_audio(detokenizer):  # noqa: F811
    reply, other = codes(120, 13), codes(70, 14)
    sessions = [detokenizer.streaming_session(hop_growth=2), detokenizer.streaming_session()]
    outs = [[], []]
    for start in range(0, 120, 5):
        entries = [(sessions[0], reply[start : start + 5], start + 5 >= 120)]
        if start < 70:
            entries.append((sessions[1], other[start : start + 5], start + 5 >= 70))
        for row, audio in enumerate(detokenizer.push_streams(entries)):
            outs[row].append(audio)
    alone = solo(detokenizer, [reply[s : s + 5] for s in range(0, 120, 5)], hop_growth=2)
    torch.testing.assert_close(torch.cat(outs[0]), torch.cat(alone), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(outs[1]), torch.cat(solo(detokenizer, [other])), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hop_growth": 0}, "hop_growth must be a whole number"),
        ({"hop_growth": 1.5}, "whole number"),
        ({"max_hop_tokens": 150}, "half the token window"),
        ({"max_hop_tokens": 5}, "between the first hop"),
    ],
)
def test_bad_hop_settings_name_the_fix(detokenizer, kwargs, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        detokenizer.streaming_session(**kwargs)
