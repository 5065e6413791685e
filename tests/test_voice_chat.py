"""VoiceChat and SpokenTurn on the tiny model: events from steps fed from outside (a batched server's row), history
across turns in the official format, cancellation that stops ``generate``, errors that reach the consumer, and
input errors that name the fix."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fun_audio_chat import (
    AudioPiece,
    GenerationFailedError,
    SpeechPiece,
    SpokenTurn,
    TextPiece,
    TurnEnd,
    VoiceChat,
)
from fun_audio_chat.tiny import TINY_TEXT_SPECIAL_IDS, tiny_detokenizer, tiny_model_and_processor

ABOS, AEOS, IM_END = (TINY_TEXT_SPECIAL_IDS[t] for t in ("<|audio_bos|>", "<|audio_eos|>", "<|im_end|>"))
TEXT_PAD, SIL = TINY_TEXT_SPECIAL_IDS["<|endoftext|>"], TINY_TEXT_SPECIAL_IDS["<|sil|>"]
BOS, EOS, PAD = 296, 297, 299


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_processor(0)


class SineVocoder:
    """A codes-to-wave callable without a streaming session (the SpeechDetokenizer protocol)."""

    sampling_rate = 24000

    def __call__(self, codes):
        return np.sin(np.arange(960 * len(codes)) / 10).astype(np.float32)


def test_a_turn_fed_from_outside_keeps_only_real_codes_and_stops_at_the_end_token(tiny):
    _, processor = tiny
    detokenizer = tiny_detokenizer(0)
    turn = SpokenTurn(processor, detokenizer, prompt_tokens=7)
    hello = processor.tokenizer.encode(" hello")
    codes = list(range(10, 30))
    steps = [  # a spoken reply as generate() streams it: transcript, <|sil|> pads, then the end
        (ABOS, None),  # the reply opens speaking: no group yet
        (hello[0], (BOS,) * 5),  # the 10 speech-BOS delay ids
        (SIL, (BOS,) * 5),
        (SIL, tuple(codes[0:5])),
        (SIL, tuple(codes[5:10])),
        (SIL, tuple(codes[10:15])),
        (SIL, tuple(codes[15:18]) + (PAD, PAD)),
        (AEOS, (EOS,) * 5),  # speech-EOS; the step's text token becomes <|audio_eos|>
        (IM_END, None),
        (TEXT_PAD, (1, 2, 3, 4, 5)),  # a batch's padding after the row ended: ignored
    ]
    events = [event for token, group in steps for event in turn.step(token, group)]
    events += turn.finish()
    texts = [e for e in events if isinstance(e, TextPiece)]
    assert [e.token_id for e in texts] == [token for token, _ in steps[:-1]]
    assert "".join(e.text for e in texts) == " hello"
    assert [c for e in events if isinstance(e, SpeechPiece) for c in e.codes] == codes[:18]
    result = events[-1].result
    assert isinstance(events[-1], TurnEnd) and result.finish_reason == "stop" and result.codes == codes[:18]
    assert result.text == " hello" and result.metrics.completion_tokens == 9 and result.metrics.prompt_tokens == 7
    audio = [e for e in events if isinstance(e, AudioPiece)]
    assert audio[-1].final and torch.equal(torch.cat([e.audio for e in audio]), result.audio)
    session = detokenizer.streaming_session()
    torch.testing.assert_close(result.audio, torch.cat([session.push(codes[:18]), session.finish()]), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already finished"):
        turn.finish()


def test_groups_of_steps_after_the_end_token_are_not_the_reply(tiny):
    _, processor = tiny
    turn = SpokenTurn(processor)
    turn.step(ABOS)
    turn.step(IM_END, (1, 2, 3, 4, 5))  # the reply ends here, speech-EOS or not; this step's group is its last
    assert turn.step(TEXT_PAD, (6, 7, 8, 9, 10)) == []  # a batch's next step: padding
    assert turn.feed_speech((11, 12, 13, 14, 15)) == []
    assert turn.finish()[-1].result.codes == [1, 2, 3, 4, 5]


def test_a_detokenizer_without_streaming_renders_at_the_end_and_a_cut_turn_says_so(tiny):
    _, processor = tiny
    turn = SpokenTurn(processor, SineVocoder())
    events = turn.step(ABOS) + turn.step(AEOS, (5, 6, 7, 8, 9))
    assert not any(isinstance(e, AudioPiece) for e in events)
    end = turn.finish(cancelled=True)
    assert isinstance(end[0], AudioPiece) and end[0].final and end[0].audio.shape == (5 * 960,)
    assert end[-1].result.finish_reason == "cancelled"
    text_turn = SpokenTurn(processor, SineVocoder(), speech=False)
    assert text_turn.feed_speech((1, 2, 3, 4, 5)) == []
    result = (text_turn.step(IM_END) + text_turn.finish())[-1].result
    assert result.codes is None and result.audio is None and result.finish_reason == "stop"


class VoiceRecordingVocoder(SineVocoder):
    """Remembers the voice each render was asked for (the keyword is passed only when a voice is chosen)."""

    def __init__(self):
        self.voices = []

    def __call__(self, codes, **kwargs):
        self.voices.append(kwargs.get("voice", "default speaker"))
        return super().__call__(codes)


def test_a_chosen_voice_reaches_the_detokenizer_and_the_chat_default_can_be_overridden(tiny):
    model, processor = tiny
    vocoder = VoiceRecordingVocoder()
    for voice in (None, "bass"):  # the same first turn (the same real codes), in the chat's voice and in another
        chat = VoiceChat(model, processor, vocoder, max_new_tokens=6, do_sample=False, voice="alto")
        assert list(chat.respond("hello there", voice=voice))[-1].result.codes
    turn = SpokenTurn(processor, vocoder)
    turn.step(AEOS, (5, 6, 7, 8, 9))
    turn.finish()
    assert vocoder.voices == ["alto", "bass", "default speaker"]


def test_history_carries_the_reply_text_to_the_next_turn(tiny):
    model, processor = tiny
    chat = VoiceChat(model, processor, tiny_detokenizer(0), max_new_tokens=6, do_sample=False)
    first = [e for e in chat.respond("hello there")][-1].result
    assert first.codes and first.audio.numel() == 960 * len(first.codes)
    assert chat.history == [
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": first.text}, {"type": "audio", "speech_codes": first.codes}],
        },
    ]
    second = [e for e in chat.respond("and then?", speech=False)][-1].result
    assert second.codes is None and second.audio is None
    # the second prompt is the first conversation plus the next user turn, rendered as the template renders it
    prompt = processor.apply_chat_template(
        chat.history[:3], add_generation_prompt=True, speech_output=False, tokenize=True, return_dict=True
    )
    assert second.metrics.prompt_tokens == len(prompt["input_ids"][0]) > first.metrics.prompt_tokens
    assert len(chat.history) == 4


def test_closing_the_iterator_stops_generate(tiny):
    model, processor = tiny
    calls = []
    hook = model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        chat = VoiceChat(model, processor, max_new_tokens=400, do_sample=False)
        events = chat.respond("talk for a long time")
        next(events)
        events.close()
    finally:
        hook.remove()
    assert len(calls) < 400  # generate stopped at its next step instead of running out its length
    assert not [t for t in threading.enumerate() if t.name == "fun-audio-chat-voice-turn"]
    assert chat.history == []  # an unfinished turn is not part of the conversation


def test_errors_reach_the_consumer_and_bad_input_names_the_fix(tiny):
    model, processor = tiny
    chat = VoiceChat(model, processor, max_new_tokens=4)
    with pytest.raises(GenerationFailedError) as failure:
        list(chat.respond("hi", num_beams=2))  # refused inside generate(), in its thread
    assert "greedy decoding and sampling only" in str(failure.value.__cause__)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        chat.respond("hi", max_new_tokens=5000)  # refused before anything runs
    with pytest.raises(TypeError, match=r"pathlib.Path \(audio file\)"):
        chat.respond(42)
    from fun_audio_chat.processing import example_audio_path

    with pytest.raises(ValueError, match=r"a str is the user's text; pass pathlib.Path\("):
        chat.respond(example_audio_path())
    with pytest.raises(ValueError, match="1-D float samples"):
        chat.respond(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError, match="must have role 'user' or 'tool'"):
        chat.respond({"role": "assistant", "content": "hi"})
    with pytest.raises(ValueError, match="pass system_prompt or that"):
        VoiceChat(model, processor, history=[{"role": "system", "content": "a"}], system_prompt="b")
    assert chat.history == []
