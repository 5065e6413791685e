"""Spoken conversation turns: the one owner of "a user speaks, the model answers with text, codes and audio".

* :class:`SpokenTurn` is one reply of one conversation, fed from outside with each decoding step's text token id
  and raw speech group (as ``generate`` streams them, or a batched server's row); it turns them into typed events:
  :class:`TextPiece` (every step, with its newly printable text), :class:`SpeechPiece` (the real codes of a group:
  :mod:`fun_audio_chat.speech_codes`), :class:`AudioPiece` (new samples from the detokenizer's streaming session)
  and a last :class:`TurnEnd` with the :class:`SpokenTurnResult` (text, codes, audio, finish reason) and its
  :class:`SpokenTurnMetrics` (time to first text, first codes, first audio, total, audio seconds, real-time factor).
* :class:`VoiceChat` keeps a conversation (the history in the processor's chat format) and answers one user turn
  at a time: :meth:`VoiceChat.respond` templates the conversation, checks that it fits the model
  (:meth:`~fun_audio_chat.FunAudioChatForConditionalGeneration.context_fit`), runs ``generate`` in a thread with a
  :class:`~fun_audio_chat.FunAudioChatIteratorStreamer` and feeds a :class:`SpokenTurn`, so audio is rendered while
  the model is still decoding. Closing the iterator stops ``generate`` at its next step; a failed ``generate``
  raises in the consumer.

History follows the official multi-turn format: an earlier assistant turn is fed back as its text (the chat
template renders assistant text only); its speech codes are kept in the message as an ``{"type": "audio",
"speech_codes": [...]}`` item, which the template skips and training examples use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .processing import TARGET_SAMPLING_RATE
from .speech_codes import SPEECH_FRAME_RATE, SpeechCodeFilter, SpeechCodeLayout

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aiff", ".aif")


# ------------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class TextPiece:
    """One decoding step's text token and the text it made printable ("" for control tokens, or while a
    multi-byte character is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class SpeechPiece:
    """The real speech codes of one step's group (never empty; delay, pad and EOS ids are not codes)."""

    codes: tuple[int, ...]


@dataclass(frozen=True)
class AudioPiece:
    """New float32 samples of the reply's audio; ``final`` marks the tail rendered when the turn ends."""

    audio: Any  # 1-D torch tensor
    sample_rate: int
    final: bool = False


@dataclass
class SpokenTurnMetrics:
    """Timings of one turn in seconds from its start (for :class:`VoiceChat`, the :meth:`~VoiceChat.respond`
    call), and its sizes."""

    first_text_seconds: float | None = None  # first reply token that printed text
    first_speech_seconds: float | None = None  # first real speech codes
    first_audio_seconds: float | None = None  # first audio samples
    total_seconds: float | None = None
    audio_seconds: float = 0.0  # duration of the reply's audio
    speech_seconds: float = 0.0  # duration of its speech codes (25 per second)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # decoding steps until the end of the reply

    @property
    def real_time_factor(self) -> float | None:
        """Turn time per second of reply audio (< 1: faster than real time); None without audio."""
        if not self.audio_seconds or self.total_seconds is None:
            return None
        return self.total_seconds / self.audio_seconds


@dataclass
class SpokenTurnResult:
    text: str
    codes: list[int] | None  # real speech codes; None for a text reply
    audio: Any | None  # the concatenated reply audio (1-D torch tensor); None without a detokenizer
    sample_rate: int | None
    finish_reason: str  # "stop" (the reply ended), "length" (max_new_tokens reached) or "cancelled"
    metrics: SpokenTurnMetrics
    token_ids: list[int] = field(default_factory=list)

    def assistant_message(self) -> dict:
        """This reply as an assistant message for the conversation history (text, plus the codes of a spoken
        reply, which the chat template does not render)."""
        content: list[dict] = [{"type": "text", "text": self.text}]
        if self.codes:
            content.append({"type": "audio", "speech_codes": list(self.codes)})
        return {"role": "assistant", "content": content}


@dataclass(frozen=True)
class TurnEnd:
    result: SpokenTurnResult


# ------------------------------------------------------------------------------------------------ one turn
class SpokenTurn:
    """One reply, fed step by step from outside; returns the typed events each step produces.

    Call :meth:`feed_text` with each step's text token id, then :meth:`feed_speech` with that step's raw speech
    group if the row committed one (the order ``generate`` streams them in), or :meth:`step` with both; then
    :meth:`finish`. Input after the end-of-reply token (a batch's padding) is ignored, except the speech group of
    that same step.

    Args:
        processor: the model's ``FunAudioChatProcessor`` (text decoding, speech ids).
        detokenizer: speech codes → audio; with ``streaming_session()`` audio comes while codes arrive, otherwise
            it is rendered once at :meth:`finish`; None for no audio.
        speech: the reply is spoken (codes are collected).
        stop_token_ids: ids that end the reply (``<|im_end|>`` is always one).
        speaker_embedding / chunked: passed to ``detokenizer.streaming_session``.
        voice: the voice to speak in (a voice object of the detokenizer, e.g. a ``CosyVoice3Voice``), passed to
            ``detokenizer.streaming_session(voice=...)`` (or to the detokenizer call of a non-streaming one); None =
            the detokenizer's default speaker.
        hop_growth: passed to ``detokenizer.streaming_session`` when not 1 (the official fixed hop): later
            synthesis calls cover more codes (see :class:`~fun_audio_chat.token2wav.StreamingSession`).
        prompt_tokens: size of the prompt, reported in the metrics.
        started_at: ``clock()`` value the timings count from (default: now).
        clock: the time source (``time.perf_counter``).
        speech_codes: the speech id layout (default: read from ``processor``; pass it to skip that per turn).
        render_audio: push each step's real codes into the turn's streaming session right away (default). A
            server that synthesises many turns in one batched call per tick (``detokenizer.push_streams``) passes
            False, takes the codes with :meth:`take_codes_to_render`, advances :attr:`audio_session` itself and
            hands the samples back with :meth:`add_audio`.
    """

    def __init__(
        self,
        processor,
        detokenizer=None,
        *,
        speech: bool = True,
        stop_token_ids: Iterable[int] = (),
        speaker_embedding=None,
        chunked: bool = False,
        voice=None,
        hop_growth: int = 1,
        prompt_tokens: int = 0,
        started_at: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        speech_codes: SpeechCodeLayout | None = None,
        render_audio: bool = True,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.detokenizer = detokenizer
        self.speech = speech
        self.stop_token_ids = {int(i) for i in stop_token_ids} | {int(processor.im_end_token_id)}
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.metrics = SpokenTurnMetrics(prompt_tokens=int(prompt_tokens))
        self.token_ids: list[int] = []
        self.codes: list[int] = []
        self.audio: list[Any] = []
        self.stopped = False  # the end-of-reply token came
        self.finished = False
        self._after_end = False  # the current step came after the end-of-reply token: its group is not the reply's
        self._filter = SpeechCodeFilter(speech_codes or SpeechCodeLayout.from_processor(processor))
        self._printed = 0
        self.render_audio = render_audio
        self._unrendered: list[int] = []  # real codes not yet pushed into the session (render_audio=False)
        self.voice = voice
        self._session = None
        if speech and detokenizer is not None and hasattr(detokenizer, "streaming_session"):
            options = self._voice_kwargs() | ({"hop_growth": hop_growth} if hop_growth != 1 else {})
            self._session = detokenizer.streaming_session(speaker_embedding, chunked=chunked, **options)

    def _voice_kwargs(self) -> dict:
        # Only a chosen voice is passed on, so detokenizers without voices keep working with the default speaker.
        return {} if self.voice is None else {"voice": self.voice}

    @property
    def sample_rate(self) -> int | None:
        if self.detokenizer is None:
            return None
        return getattr(self.detokenizer, "sample_rate", None) or getattr(self.detokenizer, "sampling_rate", None)

    def _now(self) -> float:
        return self.clock() - self.started_at

    # -------------------------------------------------------------------------------------- feeding
    def feed_text(self, token_id: int) -> list:
        """One step's text token → ``[TextPiece]`` (``[]`` after the end of the reply)."""
        if self.stopped or self.finished:
            self._after_end = True
            return []
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.stopped = True
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        piece = ""
        if not text.endswith("\ufffd"):  # an incomplete multi-byte character waits for its next byte
            piece, self._printed = text[self._printed :], len(text)
        if piece and self.metrics.first_text_seconds is None:
            self.metrics.first_text_seconds = self._now()
        return [TextPiece(token_id=token_id, text=piece)]

    def feed_speech(self, group: Iterable[int]) -> list:
        """One step's raw speech group → ``[SpeechPiece, AudioPiece?]`` for its real codes (``[]`` if none)."""
        if self.finished or self._after_end or not self.speech:
            return []
        codes = self._filter(group)
        if not codes:
            return []
        self.codes.extend(codes)
        if self.metrics.first_speech_seconds is None:
            self.metrics.first_speech_seconds = self._now()
        events: list = [SpeechPiece(codes=tuple(codes))]
        if self._session is not None:
            if self.render_audio:
                events += self._audio(self._session.push(codes), final=False)
            else:
                self._unrendered.extend(codes)
        return events

    # ------------------------------------------------------------------------- audio rendered elsewhere
    @property
    def audio_session(self):
        """The detokenizer's streaming session of this reply (None without a streaming detokenizer)."""
        return self._session

    def take_codes_to_render(self) -> list[int]:
        """The real codes received since the last call, for a caller that renders audio itself
        (``render_audio=False``); they are handed out once."""
        codes, self._unrendered = self._unrendered, []
        return codes

    def add_audio(self, samples) -> list:
        """Samples rendered from this turn's session by the caller → ``[AudioPiece]`` (``[]`` when empty)."""
        return self._audio(samples, final=False)

    def step(self, token_id: int, group: Iterable[int] | None = None) -> list:
        """:meth:`feed_text` then, when the row committed one, :meth:`feed_speech`."""
        events = self.feed_text(token_id)
        if group is not None:
            events += self.feed_speech(group)
        return events

    def _audio(self, samples, final: bool) -> list:
        import torch

        samples = torch.as_tensor(samples, dtype=torch.float32).reshape(-1).cpu()
        if not samples.numel() and not final:
            return []
        self.audio.append(samples)
        self.metrics.audio_seconds += samples.numel() / self.sample_rate
        if samples.numel() and self.metrics.first_audio_seconds is None:
            self.metrics.first_audio_seconds = self._now()
        return [AudioPiece(audio=samples, sample_rate=self.sample_rate, final=final)]

    def finish(self, cancelled: bool = False) -> list:
        """End the turn: the audio tail (``AudioPiece(final=True)``) when there is a detokenizer, then
        :class:`TurnEnd`. ``cancelled`` marks a turn stopped before its end."""
        import torch

        if self.finished:
            raise RuntimeError("this turn has already finished")
        events: list = []
        if self.speech and self.detokenizer is not None:
            if self._session is not None:
                events += self._audio(self._session.finish(), final=True)
            else:  # a codes-to-wave callable without a streaming session: the whole reply at once
                wave = (
                    self.detokenizer(self.codes, **self._voice_kwargs())
                    if self.codes
                    else np.zeros(0, dtype=np.float32)
                )
                events += self._audio(wave, final=True)
        self.finished = True
        if cancelled:
            reason = "cancelled"
        else:
            reason = "stop" if self.stopped else "length"
        metrics = self.metrics
        metrics.completion_tokens = len(self.token_ids)
        metrics.speech_seconds = len(self.codes) / SPEECH_FRAME_RATE
        metrics.total_seconds = self._now()
        audio = None
        if self.speech and self.detokenizer is not None:
            audio = torch.cat(self.audio) if self.audio else torch.zeros(0)
        result = SpokenTurnResult(
            text=self.processor.decode_text(self.token_ids),
            codes=list(self.codes) if self.speech else None,
            audio=audio,
            sample_rate=self.sample_rate if audio is not None else None,
            finish_reason=reason,
            metrics=metrics,
            token_ids=list(self.token_ids),
        )
        return events + [TurnEnd(result)]


# ------------------------------------------------------------------------------------------------ conversation
class _StopWhenCancelled:
    """Stopping criterion: every row stops once ``event`` is set (the consumer closed the turn)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class VoiceChat:
    """A conversation with the model, one spoken (or text) turn at a time.

    Example::

        chat = VoiceChat(model, processor, detokenizer)
        for event in chat.respond(waveform_16k):  # or a str, a pathlib.Path, a list of content items
            if isinstance(event, TextPiece):
                print(event.text, end="")
            elif isinstance(event, AudioPiece):
                play(event.audio, event.sample_rate)
            elif isinstance(event, TurnEnd):
                print(event.result.metrics)
        chat.respond("And in French?")  # the next turn sees the first one

    Args:
        model: a ``FunAudioChatForConditionalGeneration`` (eval mode).
        processor: its ``FunAudioChatProcessor``.
        detokenizer: speech codes → audio (a ``CosyVoice3Detokenizer`` streams; any codes-to-wave callable
            renders at the end); None for codes without audio.
        history: the conversation so far (messages in the processor's chat format); kept and extended in
            :attr:`history`.
        system_prompt: a system message to start a new conversation with (default: the official prompt for the
            turn's modality, chosen by the chat template).
        speech: reply with speech by default (text + speech codes + audio) instead of text only.
        max_new_tokens: default reply length in LLM steps (each brings 5 speech codes = 0.2 s of speech).
        speaker_embedding / chunked: passed to ``detokenizer.streaming_session``.
        voice: the default voice of the replies (see :class:`SpokenTurn`); ``respond(voice=...)`` overrides it.
        tools: function schemas for the chat template.
        generate_kwargs: default ``generate`` keyword arguments (e.g. ``do_sample=False``).
    """

    def __init__(
        self,
        model,
        processor,
        detokenizer=None,
        *,
        history: list[dict] | None = None,
        system_prompt: str | None = None,
        speech: bool = True,
        max_new_tokens: int = 256,
        speaker_embedding=None,
        chunked: bool = False,
        voice=None,
        tools: list | None = None,
        **generate_kwargs,
    ):
        self.model = model
        self.processor = processor
        self.detokenizer = detokenizer
        self.history: list[dict] = list(history or [])
        if system_prompt is not None:
            if self.history and self.history[0].get("role") == "system":
                raise ValueError(
                    "the history already starts with a system message; pass system_prompt or that, not both."
                )
            self.history.insert(0, {"role": "system", "content": system_prompt})
        self.speech = speech
        self.max_new_tokens = max_new_tokens
        self.speaker_embedding = speaker_embedding
        self.chunked = chunked
        self.voice = voice
        self.tools = tools
        self.generate_kwargs = generate_kwargs
        self.speech_codes = SpeechCodeLayout.from_processor(processor)
        eos = model.generation_config.eos_token_id
        self.stop_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])

    # -------------------------------------------------------------------------------------- input
    @staticmethod
    def turn_messages(user_input, sampling_rate: int = TARGET_SAMPLING_RATE) -> list[dict]:
        """The new messages of a turn: from a string (text), a ``pathlib.Path`` (an audio file), a waveform (numpy
        array or tensor at ``sampling_rate``), a list of content items (one user message), or a ``user``/``tool``
        message or a list of them (e.g. the results of the tool calls of the previous reply)."""
        if isinstance(user_input, Mapping) or (
            isinstance(user_input, (list, tuple))
            and user_input
            and all(isinstance(item, Mapping) and "role" in item for item in user_input)
        ):
            messages = [user_input] if isinstance(user_input, Mapping) else list(user_input)
            for message in messages:
                if message.get("role") not in ("user", "tool"):
                    raise ValueError(
                        f"a message given to respond() must have role 'user' or 'tool', got {message.get('role')!r}; "
                        "put earlier turns in the history instead."
                    )
            return [dict(message) for message in messages]
        if isinstance(user_input, str):
            if user_input.lower().endswith(AUDIO_SUFFIXES) and Path(user_input).expanduser().is_file():
                raise ValueError(
                    f"{user_input!r} is an audio file, but a str is the user's text; pass "
                    f"pathlib.Path({user_input!r}) to send the audio."
                )
            content: Any = [{"type": "text", "text": user_input}]
        elif isinstance(user_input, Path):
            content = [{"type": "audio", "path": str(user_input)}]
        elif isinstance(user_input, (list, tuple)) and all(isinstance(item, Mapping) for item in user_input):
            content = list(user_input)
        elif hasattr(user_input, "shape") or isinstance(user_input, (list, tuple)):
            waveform = user_input.detach().cpu().numpy() if hasattr(user_input, "detach") else np.asarray(user_input)
            if waveform.ndim != 1 or not np.issubdtype(waveform.dtype, np.floating):
                raise ValueError(
                    f"a waveform must be 1-D float samples (mono), got shape {waveform.shape} of {waveform.dtype}; "
                    "downmix it, or pass a pathlib.Path to an audio file."
                )
            content = [{"type": "audio", "audio": waveform, "sampling_rate": sampling_rate}]
        else:
            raise TypeError(
                f"respond() takes a str (text), a pathlib.Path (audio file), a 1-D waveform, a list of content items "
                f"or user/tool messages; got {type(user_input).__name__}."
            )
        return [{"role": "user", "content": content}]

    # -------------------------------------------------------------------------------------- one turn
    def respond(
        self,
        user_input,
        *,
        speech: bool | None = None,
        max_new_tokens: int | None = None,
        sampling_rate: int = TARGET_SAMPLING_RATE,
        seed: int | None = None,
        voice=None,
        **generate_kwargs,
    ) -> Iterator:
        """Answer one turn (``user_input``: see :meth:`turn_messages`): yields :class:`TextPiece`, :class:`SpeechPiece`, :class:`AudioPiece` events while
        the reply is decoded, then :class:`TurnEnd`; the turn is then part of :attr:`history`.

        Raises ``ValueError`` (before anything runs) when the conversation plus ``max_new_tokens`` does not fit
        the model, and :class:`~fun_audio_chat.GenerationFailedError` (from the cause) if ``generate`` fails.
        Closing the iterator early stops ``generate`` at its next step; the turn is then not added to the
        history. ``seed`` seeds torch right before generating (sampled replies); ``voice`` speaks this reply in
        another voice than the chat's."""
        started_at = time.perf_counter()
        speech = self.speech if speech is None else speech
        if speech and self.model.audio_invert_tower is None:
            raise ValueError("this model has no Speech Refined Head (speech-to-text only); pass speech=False.")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        messages = self.history + self.turn_messages(user_input, sampling_rate)
        template_kwargs = {"tools": self.tools} if self.tools else {}
        inputs = self.processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            speech_output=speech,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **template_kwargs,
        ).to(self.model.device)
        prompt_length = int(inputs["input_ids"].shape[1])
        self.model.context_fit(prompt_length, max_new_tokens, speech=speech).check()
        voice = self.voice if voice is None else voice
        return self._run(messages, inputs, speech, max_new_tokens, seed, voice, started_at, generate_kwargs)

    def _run(self, messages, inputs, speech, max_new_tokens, seed, voice, started_at, generate_kwargs) -> Iterator:
        """The turn's events; ``generate`` starts with the first ``next()``."""
        import torch
        from transformers import StoppingCriteriaList

        from .modeling.streamers import FunAudioChatIteratorStreamer, SpeechEvent, TextEvent

        turn = SpokenTurn(
            self.processor,
            self.detokenizer,
            speech=speech,
            stop_token_ids=self.stop_token_ids,
            speaker_embedding=self.speaker_embedding,
            chunked=self.chunked,
            voice=voice,
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            started_at=started_at,
            speech_codes=self.speech_codes,
        )
        streamer = FunAudioChatIteratorStreamer(tokenizer=None)
        cancelled = threading.Event()
        kwargs = {**self.generate_kwargs, **generate_kwargs}
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(_StopWhenCancelled(cancelled))
        kwargs.update(max_new_tokens=max_new_tokens, streamer=streamer, stopping_criteria=criteria)
        if speech:
            kwargs.setdefault("force_audio_bos", True)  # the official speech-to-speech setting: it opens speaking
        else:
            kwargs["return_speech"] = False

        def generate():
            try:
                with torch.inference_mode():
                    if seed is not None:
                        torch.manual_seed(seed)
                    self.model.generate(**inputs, **kwargs)
            except BaseException:  # noqa: BLE001 - generate() hands the error to the streamer's consumer
                pass

        worker = threading.Thread(target=generate, daemon=True, name="fun-audio-chat-voice-turn")

        def events():
            worker.start()
            ended = False
            try:
                for event in streamer:
                    if event.row != 0:
                        continue
                    if isinstance(event, TextEvent):
                        yield from turn.feed_text(event.token_id)
                    elif isinstance(event, SpeechEvent):
                        with torch.inference_mode():
                            yield from turn.feed_speech(event.codes)
                with torch.inference_mode():
                    final = turn.finish()
                ended = True
                self.history = messages + [final[-1].result.assistant_message()]
                yield from final
            finally:
                if not ended:
                    cancelled.set()  # generate stops at its next step
                worker.join()

        return events()


__all__ = [
    "AudioPiece",
    "SpeechPiece",
    "SpokenTurn",
    "SpokenTurnMetrics",
    "SpokenTurnResult",
    "TextPiece",
    "TurnEnd",
    "VoiceChat",
]
