"""A model fitted on one spoken reply streams it, through every public streaming path, as exactly its real codes.

The tiny model is fitted (plain Adam on the library's training example, as the SFT recipe builds it) until greedy
generation returns the trained reply the way the released model writes one: two groups of speech-BOS delay ids,
the codes, a pad tail, then speech-EOS. The reply is then streamed through :class:`~fun_audio_chat.VoiceChat`,
``FunAudioChatIteratorStreamer`` + ``SpeechAudioStreamer`` and the server engine into the tiny detokenizer, which
knows only the 296 real codes (a delay id reaching it is a ``ValueError``). Each stream must equal what a streaming
session renders from the reply's real codes: pushing codes in groups or at once runs the same session calls, so the
audio must agree to fp32 rounding.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fun_audio_chat import (
    AudioPiece,
    FunAudioChatIteratorStreamer,
    SpeechEvent,
    SpeechPiece,
    TextPiece,
    TurnEnd,
    VoiceChat,
)
from fun_audio_chat.speech_codes import SpeechCodeLayout
from fun_audio_chat.tiny import TINY_SPEECH_CODES, tiny_detokenizer, tiny_model_and_processor
from fun_audio_chat.token2wav import AudioEvent, SpeechAudioStreamer

QUESTION, ANSWER = "say hi", "hi"
NUM_CODES, DELAY, GROUP = 25, 10, 5
GREEDY = {"do_sample": False, "speech_do_sample": False, "speech_repetition_penalty": 1.0}
MAX_NEW_TOKENS = 12  # the reply takes 10 steps: <|audio_bos|>, 7 speech groups, the speech-EOS group, <|im_end|>


def _user_turn() -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are fastest on one thread (and a shared machine's cores are not this test's alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(one_thread):
    """(model, processor, codes, expected raw speech ids): a tiny model that greedily says exactly its one reply."""
    from fun_audio_chat.processing import FunAudioChatDataCollator

    model, processor = tiny_model_and_processor(0)
    codes = np.random.default_rng(0).choice(TINY_SPEECH_CODES, size=NUM_CODES, replace=False).tolist()
    reply = {
        "role": "assistant",
        "content": [{"type": "text", "text": ANSWER}, {"type": "audio", "speech_codes": codes}],
    }
    batch = FunAudioChatDataCollator(processor)([processor.build_training_example(_user_turn() + [reply])])
    layout = SpeechCodeLayout.of(processor)
    groups = -(-(DELAY + NUM_CODES) // GROUP)
    expected = [layout.bos_token_id] * DELAY + codes
    expected += [layout.pad_token_id] * (groups * GROUP - len(expected)) + [layout.eos_token_id] * GROUP
    inputs = processor.apply_chat_template(
        _user_turn(),
        add_generation_prompt=True,
        speech_output=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(1, 241):
        model.train()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            model.eval()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True, **GREEDY)
            if out.speech_ids[0].tolist() == expected:
                break
    else:
        pytest.fail("the tiny model did not learn its one reply in 240 steps")
    model.eval()
    model.generation_config.speech_repetition_penalty = 1.0  # greedy codes in every path, the server's included
    return model, processor, codes, expected


@pytest.fixture(scope="module")
def detokenizer():
    return tiny_detokenizer(0)


@pytest.fixture(scope="module")
def reference_audio(fitted, detokenizer):
    """What a streaming session renders from the reply's real codes."""
    session = detokenizer.streaming_session()
    return torch.cat([session.push(fitted[2]), session.finish()])


def test_the_fitted_reply_opens_with_delay_ids_the_detokenizer_refuses(fitted, detokenizer, reference_audio):
    model, processor, codes, expected = fitted
    assert expected[:DELAY] == [processor.speech_bos_token_id] * DELAY  # like the released model's replies
    assert processor.decode_speech(torch.tensor([expected])) == [codes]
    with pytest.raises(ValueError, match=r"speech codes must be in \[0, 296\)"):
        detokenizer.streaming_session().push(expected[:GROUP])  # what the streaming paths used to push
    assert reference_audio.shape == (NUM_CODES * 960,)


def test_voice_chat_streams_the_real_codes_and_their_audio(fitted, detokenizer, reference_audio):
    model, processor, codes, _ = fitted
    chat = VoiceChat(model, processor, detokenizer, max_new_tokens=MAX_NEW_TOKENS, **GREEDY)
    events = list(chat.respond(QUESTION))
    assert isinstance(events[-1], TurnEnd)
    result = events[-1].result
    streamed_codes = [c for e in events if isinstance(e, SpeechPiece) for c in e.codes]
    chunks = [e for e in events if isinstance(e, AudioPiece)]
    assert streamed_codes == result.codes == codes
    assert len(chunks) >= 2 and chunks[-1].final and not any(c.final for c in chunks[:-1])  # audio while decoding
    first_audio = events.index(chunks[0])
    assert any(isinstance(e, SpeechPiece) for e in events[first_audio + 1 :])  # before the last codes arrived
    torch.testing.assert_close(torch.cat([c.audio for c in chunks]), reference_audio, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.audio, reference_audio, atol=1e-5, rtol=0)
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == result.text == ANSWER
    assert result.finish_reason == "stop" and result.metrics.completion_tokens == 10
    metrics = result.metrics
    assert 0 < metrics.first_speech_seconds <= metrics.first_audio_seconds <= metrics.total_seconds
    assert metrics.audio_seconds == pytest.approx(NUM_CODES / 25) == metrics.speech_seconds
    assert metrics.real_time_factor == pytest.approx(metrics.total_seconds / metrics.audio_seconds)
    # the next turn sees this one as the official format writes it: the reply's text (its codes ride along)
    assert chat.history[-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": ANSWER}, {"type": "audio", "speech_codes": codes}],
    }


def test_iterator_streamer_with_speech_audio_streamer(fitted, detokenizer, reference_audio):
    model, processor, codes, expected = fitted
    inputs = processor.apply_chat_template(
        _user_turn(),
        add_generation_prompt=True,
        speech_output=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    streamer = FunAudioChatIteratorStreamer(processor.tokenizer, timeout=120)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=MAX_NEW_TOKENS, force_audio_bos=True, **GREEDY)
    worker = threading.Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    events = list(SpeechAudioStreamer(streamer, detokenizer, processor))
    worker.join()
    raw = [c for e in events if isinstance(e, SpeechEvent) for c in e.codes]
    assert raw == expected  # the streamer hands out raw groups; only their real codes were voiced
    audio = torch.cat([e.audio for e in events if isinstance(e, AudioEvent)])
    torch.testing.assert_close(audio, reference_audio, atol=1e-5, rtol=0)


def test_server_engine_streams_the_same_audio(fitted, detokenizer, reference_audio):
    from fun_audio_chat.serving.engine import AudioDelta, ServingEngine, TurnDone, TurnRequest

    model, processor, codes, _ = fitted
    engine = ServingEngine(model, processor, detokenizer, batch_window=0).start()
    try:
        handle = engine.submit(TurnRequest(_user_turn(), speech=True, max_new_tokens=MAX_NEW_TOKENS, temperature=0))
        events = list(handle)
    finally:
        engine.close()
    assert isinstance(events[-1], TurnDone)
    result = events[-1].result
    assert result.codes == codes and result.text == ANSWER and result.finish_reason == "stop"
    streamed = np.concatenate([e.samples for e in events if isinstance(e, AudioDelta)])
    torch.testing.assert_close(torch.from_numpy(streamed), reference_audio, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(result.audio), reference_audio, atol=1e-5, rtol=0)
