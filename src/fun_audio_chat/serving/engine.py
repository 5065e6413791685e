"""One model instance serving many conversations: requests that arrive together are decoded as one batch.

:class:`ServingEngine` owns the model, the processor and (optionally) a speech detokenizer. A request is a
:class:`TurnRequest` (a conversation in the processor's chat format plus decoding settings); :meth:`submit`
returns a :class:`TurnHandle` whose events arrive while the reply is generated:

* :class:`TextDelta` — newly decoded reply text;
* :class:`AudioDelta` — newly synthesized reply audio (float32 samples at ``detokenizer.sample_rate``);
* :class:`TurnDone` — the whole reply (:class:`TurnResult`: text, speech codes, finish reason, timings);
* :class:`TurnFailed` — the turn could not be generated (the exception says why).

Threads:

* the **generation thread** takes the oldest waiting request plus every waiting request that can share its batch
  (same :meth:`TurnRequest.batch_key`: modality, sampling settings, length limit, tools), templates them as one
  left-padded batch and runs ``model.generate`` with a :class:`~fun_audio_chat.FunAudioChatIteratorStreamer`.
  ``generate`` keeps every row of a padded batch equal to the same row decoded alone, so batching changes
  throughput, never an answer (under greedy settings). Sampled requests with a ``seed`` run alone, so their seed
  alone decides their answer;
* the **speech thread** turns each row's 25 Hz speech codes into audio with one streaming detokenizer session per
  request, so synthesis overlaps with the next decoding steps; the request whose client has received the least
  audio is served first.

A row whose reply ends (``<|im_end|>``) before the rest of its batch is answered at once.

A cancelled handle (its client went away) stops its row at the next decoding step through a stopping criterion;
when every row of a batch is cancelled, ``generate`` returns at once. The batch itself is fixed for its lifetime
(rows cannot join a running ``generate`` call), so a cancelled row stops decoding and streaming but its slot is
only reused by the next batch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("fun_audio_chat.serving")

SPEECH_FRAME_RATE = 25  # speech codes per second of audio


# ------------------------------------------------------------------------------------------------ requests
class TurnCancelled(Exception):
    """The turn was cancelled before it produced anything."""


@dataclass
class TurnRequest:
    """One reply to generate.

    Args:
        messages: the conversation in the processor's chat format (audio items carry 16 kHz waveforms).
        speech: reply with speech (text + speech codes + audio) instead of text only.
        max_new_tokens: LLM steps of the reply (each step brings 5 speech codes = 0.2 s of speech).
        temperature: 0 = greedy text and speech codes (deterministic); > 0 = sampled text (speech codes are then
            sampled with the model's speech settings).
        top_p: nucleus sampling of the text (sampling only).
        seed: makes a sampled reply repeatable (the request is decoded in a batch of its own).
        tools: JSON schemas of the functions the model may call (rendered by the chat template).
    """

    messages: list[dict]
    speech: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tools: list[dict] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, unique: int) -> tuple:
        """Requests with equal keys can share one ``generate`` call."""
        tools = json.dumps(self.tools, sort_keys=True) if self.tools else None
        sampling = ("greedy",) if self.greedy else ("sample", self.temperature, self.top_p)
        if not self.greedy and self.seed is not None:
            sampling += ("alone", unique)  # a seed fixes the RNG of the whole generate call: decode it alone
        return (self.speech, self.max_new_tokens, tools) + sampling

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.speech:
            kwargs["force_audio_bos"] = True  # the official speech-to-speech setting: the reply opens in speech
        else:
            kwargs["return_speech"] = False
        if self.greedy:
            kwargs["do_sample"] = False
            if self.speech:
                kwargs["speech_do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kwargs


# ------------------------------------------------------------------------------------------------ events
@dataclass
class TurnMetrics:
    """Timings of one turn, in seconds from the moment the request was submitted."""

    batch_size: int = 0
    queue_seconds: float | None = None  # waiting for the generation thread
    first_text_seconds: float | None = None  # to the first reply text token
    first_audio_seconds: float | None = None  # to the first audio samples
    total_seconds: float | None = None
    audio_seconds: float = 0.0  # duration of the synthesized reply
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def real_time_factor(self) -> float | None:
        """Time from start of decoding to the last audio sample, divided by the audio's duration (< 1 = faster
        than real time)."""
        if not self.audio_seconds or self.total_seconds is None:
            return None
        return (self.total_seconds - (self.queue_seconds or 0.0)) / self.audio_seconds


@dataclass
class TurnResult:
    text: str
    codes: list[int] | None
    audio: np.ndarray | None  # the concatenated streamed audio (float32), None without speech synthesis
    sample_rate: int | None
    finish_reason: str  # "stop", "length" or "cancelled"
    metrics: TurnMetrics


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class AudioDelta:
    samples: np.ndarray


@dataclass(frozen=True)
class TurnDone:
    result: TurnResult


@dataclass(frozen=True)
class TurnFailed:
    error: BaseException


class TurnHandle:
    """The client side of one submitted turn: iterate its events (sync or async), or cancel it."""

    def __init__(self, request: TurnRequest, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.request_id = request_id
        self.submitted_at = time.perf_counter()
        self.metrics = TurnMetrics()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_queue: queue.Queue = queue.Queue()
        # filled by the engine
        self.prompt_length = 0
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.codes: list[int] = []  # real speech codes streamed so far
        self.speech_ended = False
        self.audio_parts: list[np.ndarray] = []

    # engine side ---------------------------------------------------------------------------------
    def _since_submit(self) -> float:
        return time.perf_counter() - self.submitted_at

    def _emit(self, event) -> None:
        if isinstance(event, TextDelta) and self.metrics.first_text_seconds is None:
            self.metrics.first_text_seconds = self._since_submit()
        if isinstance(event, AudioDelta) and self.metrics.first_audio_seconds is None:
            self.metrics.first_audio_seconds = self._since_submit()
        if isinstance(event, (TurnDone, TurnFailed)):
            self.finished.set()
        if self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass
        else:
            self._sync_queue.put(event)

    # client side ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating this turn (its row stops at the next decoding step)."""
        self.cancelled.set()

    def __iter__(self):
        """Events until (and including) :class:`TurnDone` or :class:`TurnFailed` (for handles made outside a loop)."""
        if self._async_queue is not None:
            raise RuntimeError("this handle was submitted from an event loop: use `async for`.")
        while True:
            event = self._sync_queue.get()
            yield event
            if isinstance(event, (TurnDone, TurnFailed)):
                return

    async def next_event(self, timeout: float | None = None):
        """The next event, or None when ``timeout`` seconds pass first (handles submitted from a coroutine)."""
        if self._async_queue is None:
            raise RuntimeError("this handle was submitted outside an event loop: iterate it with `for`.")
        try:
            return await asyncio.wait_for(self._async_queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def result(self) -> TurnResult:
        """Block until the turn ends (sync handles); raises the turn's error."""
        for event in self:
            if isinstance(event, TurnFailed):
                raise event.error
            if isinstance(event, TurnDone):
                return event.result
        raise RuntimeError("turn ended without a result")  # pragma: no cover


# ------------------------------------------------------------------------------------------------ engine
class _CancelledRows:
    """Stopping criterion: True for the rows whose client went away (generate pads them from then on)."""

    def __init__(self, handles: list[TurnHandle]):
        self.handles = handles

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        flags = [handle.cancelled.is_set() for handle in self.handles]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class ServingEngine:
    """Batches turns through one model (see the module docstring).

    Args:
        model: a :class:`~fun_audio_chat.FunAudioChatForConditionalGeneration` in eval mode.
        processor: its :class:`~fun_audio_chat.FunAudioChatProcessor`.
        detokenizer: speech codes → audio (``sample_rate``, ``streaming_session()``); None = no audio (speech
            requests still get their text; :attr:`can_speak` is False).
        max_batch_size: most rows in one ``generate`` call.
        batch_window: seconds the generation thread waits after a request arrives for others to join its batch.
        generate_kwargs: extra ``generate`` keyword arguments for every call (e.g. ``logits_processor``).
    """

    def __init__(
        self,
        model,
        processor,
        detokenizer=None,
        *,
        max_batch_size: int = 8,
        batch_window: float = 0.025,
        generate_kwargs: dict | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model = model
        self.processor = processor
        self.detokenizer = detokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.extra_generate_kwargs = dict(generate_kwargs or {})
        self.on_turn_end = None  # callable(TurnHandle, TurnResult | None, BaseException | None), e.g. metrics
        self._pending: deque[TurnHandle] = deque()
        self._pending_lock = threading.Condition()
        self._speech_jobs: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.batches_run = 0
        self.busy = threading.Event()

    # ------------------------------------------------------------------ properties
    @property
    def can_speak(self) -> bool:
        return self.detokenizer is not None and self.model.audio_invert_tower is not None

    @property
    def sample_rate(self) -> int | None:
        return getattr(self.detokenizer, "sample_rate", None) if self.detokenizer is not None else None

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def queue_depth(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ServingEngine:
        if self._threads:
            return self
        self._threads = [
            threading.Thread(target=self._generation_loop, daemon=True, name="fun-audio-chat-generation"),
            threading.Thread(target=self._speech_loop, daemon=True, name="fun-audio-chat-speech"),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        with self._pending_lock:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            self._pending_lock.notify_all()
        for handle in waiting:
            handle._emit(TurnFailed(RuntimeError("the server is shutting down")))
        self._speech_jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    def submit(self, request: TurnRequest) -> TurnHandle:
        """Queue a turn. From a coroutine the handle is iterated with ``async for``, otherwise with ``for``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = TurnHandle(request, next(self._ids), loop)
        with self._pending_lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(handle)
            self._pending_lock.notify()
        if not self._threads:
            self.start()
        return handle

    # ------------------------------------------------------------------ prompt
    # The processor (and its tokenizer) is used by the generation thread only: templating happens there.
    def _check_fits(self, prompt_length: int, request: TurnRequest) -> None:
        if request.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_new_tokens}.")
        speech = request.speech and self.model.audio_invert_tower is not None
        self.model.context_fit(prompt_length, request.max_new_tokens, speech=speech).check(length_name="max_tokens")

    def _template(self, requests: list[TurnRequest]):
        first = requests[0]
        kwargs = {"tools": first.tools} if first.tools else {}
        return self.processor.apply_chat_template(
            [request.messages for request in requests],
            add_generation_prompt=True,
            speech_output=first.speech,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **kwargs,
        )

    # ------------------------------------------------------------------ generation thread
    def _next_batch(self) -> list[TurnHandle] | None:
        with self._pending_lock:
            while not self._pending and not self._closed:
                self._pending_lock.wait()
            if self._closed:
                return None
            first = self._pending[0]
        if self.batch_window > 0:
            time.sleep(self.batch_window)  # let requests sent at the same moment join
        with self._pending_lock:
            key = first.request.batch_key(first.request_id)
            batch, rest = [], deque()
            while self._pending:
                handle = self._pending.popleft()
                if handle.cancelled.is_set():
                    handle._emit(TurnFailed(TurnCancelled("the client went away before the turn started")))
                elif len(batch) < self.max_batch_size and handle.request.batch_key(handle.request_id) == key:
                    batch.append(handle)
                else:
                    rest.append(handle)
            self._pending = rest
        return batch

    def _generation_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.busy.set()
            try:
                self._run_batch(batch)
            except Exception as err:  # noqa: BLE001 - reported to the clients, the server keeps serving
                started_streaming = any(handle.metrics.first_text_seconds is not None for handle in batch)
                if len(batch) > 1 and not started_streaming:
                    # one bad row must not fail the others: decode each alone
                    logger.warning("batch of %d failed (%s); decoding its rows one by one", len(batch), err)
                    for handle in batch:
                        try:
                            self._run_batch([handle])
                        except Exception as row_err:  # noqa: BLE001
                            self._fail(handle, row_err)
                else:
                    self._fail(batch[0], err)
            finally:
                self.busy.clear()

    def _fail(self, handle: TurnHandle, error: BaseException) -> None:
        if handle.finished.is_set():
            return
        logger.info("turn %d failed: %s", handle.request_id, error)
        if self.on_turn_end is not None:
            self.on_turn_end(handle, None, error)
        handle._emit(TurnFailed(error))

    def _run_batch(self, batch: list[TurnHandle]) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from ..modeling import FunAudioChatIteratorStreamer, SpeechEvent, TextEvent

        started = time.perf_counter()
        request = batch[0].request
        inputs = self._template([handle.request for handle in batch]).to(self.model.device)
        prompt_length = int(inputs["input_ids"].shape[1])
        self._check_fits(prompt_length, request)
        for handle in batch:
            handle.metrics.batch_size = len(batch)
            handle.metrics.queue_seconds = started - handle.submitted_at
            handle.prompt_length = prompt_length
            handle.text_parts, handle.codes, handle.audio_parts, handle.token_ids = [], [], [], []
            handle.speech_ended = False
        speaking = request.speech and self.can_speak
        if speaking:
            for handle in batch:
                self._speech_jobs.put((handle, "start", None))

        streamer = FunAudioChatIteratorStreamer(self.processor.tokenizer, skip_special_tokens=True, timeout=None)
        kwargs = request.generate_kwargs()
        kwargs.update(self.extra_generate_kwargs)
        kwargs.update(
            streamer=streamer,
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([_CancelledRows(batch)]),
        )
        outcome: dict[str, Any] = {}

        def run():
            try:
                with torch.inference_mode():
                    if not request.greedy and request.seed is not None:
                        torch.manual_seed(request.seed)
                    outcome["output"] = self.model.generate(**inputs, **kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised below, in this thread
                outcome["error"] = err
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="fun-audio-chat-generate")
        worker.start()
        eos_ids = self._stop_token_ids()
        ending: set[int] = set()  # rows whose end-of-reply token came in this step
        done: set[int] = set()  # rows already answered
        try:
            for event in streamer:
                row = event.row
                handle = batch[row]
                if row in done or handle.cancelled.is_set():
                    continue
                if isinstance(event, TextEvent):
                    if row in ending:
                        # the next step began: the row's last speech group has been delivered, its turn can end now
                        # instead of when the longest row of the batch ends
                        codes = list(handle.codes) if request.speech else None
                        self._complete(
                            handle,
                            self.processor.decode_text(handle.token_ids),
                            codes,
                            "stop",
                            len(handle.token_ids),
                            int(inputs["attention_mask"][row].sum()),
                            speaking,
                        )
                        done.add(row)
                        continue
                    handle.token_ids.append(event.token_id)
                    if event.text:
                        handle.text_parts.append(event.text)
                        handle._emit(TextDelta(event.text))
                    if event.token_id in eos_ids:
                        ending.add(row)
                elif isinstance(event, SpeechEvent):
                    codes = self._speech_codes(handle, event.codes)
                    handle.codes.extend(codes)
                    if speaking and codes:
                        self._speech_jobs.put((handle, "codes", codes))
        except Exception:  # noqa: BLE001 - the streamer re-raises a failed generate(); report the original error
            worker.join()
            if "error" not in outcome:
                raise
        worker.join()
        self.batches_run += 1
        if "error" in outcome:
            if speaking:
                for row, handle in enumerate(batch):
                    if row not in done:
                        self._speech_jobs.put((handle, "drop", None))
            raise outcome["error"]

        output = outcome["output"]
        sequences = output.sequences[:, prompt_length:]
        texts = self.processor.decode_text(sequences)
        codes = (
            self.processor.decode_speech(output.speech_ids, output.speech_attention_mask) if request.speech else None
        )
        for row, handle in enumerate(batch):
            if row in done:
                continue
            row_ids = sequences[row].tolist()
            ended = next((i for i, token in enumerate(row_ids) if token in eos_ids), None)
            if handle.cancelled.is_set():
                reason = "cancelled"
            elif ended is not None:
                reason = "stop"
            else:
                reason = "length"
            self._complete(
                handle,
                texts[row],
                codes[row] if codes is not None else None,
                reason,
                (ended + 1) if ended is not None else len(row_ids),
                int(inputs["attention_mask"][row].sum()),
                speaking,
            )

    def _speech_codes(self, handle: TurnHandle, group) -> list[int]:
        """The real speech codes of a streamed group (:func:`fun_audio_chat.speech_codes.real_speech_codes`)."""
        from ..speech_codes import SpeechCodeLayout, real_speech_codes

        if handle.speech_ended:
            return []
        layout = getattr(self, "_speech_code_layout", None)
        if layout is None:  # read once: the processor counts its speech vocabulary to find it
            layout = self._speech_code_layout = SpeechCodeLayout.from_processor(self.processor)
        codes, handle.speech_ended = real_speech_codes(group, layout)
        return codes

    def _complete(self, handle, text, codes, reason, completion_tokens, prompt_tokens, speaking) -> None:
        handle.metrics.prompt_tokens = prompt_tokens
        handle.metrics.completion_tokens = completion_tokens
        result = TurnResult(
            text=text,
            codes=codes,
            audio=None,
            sample_rate=self.sample_rate if speaking else None,
            finish_reason=reason,
            metrics=handle.metrics,
        )
        if speaking:
            self._speech_jobs.put((handle, "finish", result))
        else:
            self._finish(handle, result)

    def _stop_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        ids.add(self.processor.im_end_token_id)
        return ids

    def _finish(self, handle: TurnHandle, result: TurnResult) -> None:
        handle.metrics.total_seconds = handle._since_submit()
        if self.on_turn_end is not None:
            self.on_turn_end(handle, result, None)
        handle._emit(TurnDone(result))

    # ------------------------------------------------------------------ speech thread
    def _speech_loop(self) -> None:
        """Runs the detokenizer sessions. Jobs of one turn run in order; across turns, the turn whose client has
        received the least audio goes first, so a turn of a later batch is not starved by an earlier batch whose
        codes all arrived at once (the LLM usually runs ahead of synthesis)."""
        sessions: dict[int, Any] = {}
        waiting: dict[int, deque] = {}  # request id -> its jobs not yet run, in order
        handles: dict[int, TurnHandle] = {}
        closing = False
        while not (closing and not waiting):
            block = not waiting
            while True:
                try:
                    job = self._speech_jobs.get(block=block)
                except queue.Empty:
                    break
                block = False
                if job is None:
                    closing = True
                    continue
                handle = job[0]
                handles[handle.request_id] = handle
                waiting.setdefault(handle.request_id, deque()).append(job)
            if not waiting:
                continue
            request_id = min(waiting, key=lambda rid: (handles[rid].metrics.audio_seconds, rid))
            jobs = waiting[request_id]
            self._run_speech_job(jobs.popleft(), sessions)
            if not jobs:
                del waiting[request_id]
                if request_id not in sessions:
                    handles.pop(request_id, None)

    def _run_speech_job(self, job, sessions: dict) -> None:
        import torch

        handle, kind, payload = job
        try:
            if kind == "start":
                sessions[handle.request_id] = self.detokenizer.streaming_session()
            elif kind == "drop":
                sessions.pop(handle.request_id, None)
            elif kind == "codes":
                session = sessions.get(handle.request_id)
                if session is None or handle.cancelled.is_set():
                    return
                with torch.inference_mode():
                    samples = session.push(list(payload))
                self._emit_audio(handle, samples)
            elif kind == "finish":
                session = sessions.pop(handle.request_id, None)
                if session is not None and not handle.cancelled.is_set():
                    with torch.inference_mode():
                        self._emit_audio(handle, session.finish())
                result: TurnResult = payload
                if handle.audio_parts:
                    result.audio = np.concatenate(handle.audio_parts)
                else:
                    result.audio = np.zeros(0, dtype=np.float32)
                self._finish(handle, result)
        except Exception as err:  # noqa: BLE001 - this turn fails, the others go on
            sessions.pop(handle.request_id, None)
            if not handle.finished.is_set():
                self._fail(handle, RuntimeError(f"speech synthesis failed: {err}"))

    def _emit_audio(self, handle: TurnHandle, samples) -> None:
        if samples is None:
            return
        array = samples.detach().cpu().float().numpy() if hasattr(samples, "detach") else np.asarray(samples)
        array = np.ascontiguousarray(array.reshape(-1), dtype=np.float32)
        if array.size == 0:
            return
        handle.audio_parts.append(array)
        handle.metrics.audio_seconds += array.size / self.sample_rate
        handle._emit(AudioDelta(array))


__all__ = [
    "AudioDelta",
    "ServingEngine",
    "TextDelta",
    "TurnCancelled",
    "TurnDone",
    "TurnFailed",
    "TurnHandle",
    "TurnMetrics",
    "TurnRequest",
    "TurnResult",
]
