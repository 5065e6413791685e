"""One model instance serving many conversations: replies join and leave one running batch at decoding steps.

:class:`ServingEngine` owns the model, the processor and (optionally) a speech detokenizer. A request is a
:class:`TurnRequest` (a conversation in the processor's chat format plus decoding settings); :meth:`submit`
returns a :class:`TurnHandle` whose events arrive while the reply is generated:

* :class:`TextDelta` — newly decoded reply text;
* :class:`AudioDelta` — newly synthesized reply audio (float32 samples at ``detokenizer.sample_rate``);
* :class:`TurnDone` — the whole reply (:class:`TurnResult`: text, speech codes, finish reason, timings);
* :class:`TurnFailed` — the turn could not be generated (the exception says why).

Each turn is a :class:`~fun_audio_chat.SpokenTurn` (the library's one owner of a spoken turn: text pieces, the real
speech codes of each group, the audio, the result); the engine only schedules. Two threads:

* the **generation thread** runs a :class:`~fun_audio_chat.modeling.ContinuousBatchDecoder`: a request is
  templated and prefilled alone as soon as the thread is between two decoding steps, joins the running batch at the
  next step and leaves it on the step its reply ends, so a request never waits for other replies to end. Every
  row keeps its own positions, settings and (with a ``seed``) random stream, so a greedy reply equals the same
  request decoded alone whichever rows share the batch, and a seeded reply repeats;
* the **speech threads** (``synthesis_workers``, one by default) render the real speech codes of every speaking
  turn: a turn is given to the worker with the fewest turns when it starts; at each tick, everything that arrived
  since the last tick goes through one ``detokenizer.push_streams`` call of that worker (one batched flow call for
  its replies, batched vocoder windows), each reply equal to its own streaming session. Synthesis is the larger
  cost and is compute-bound: more workers let it use the cores the LLM thread leaves idle.

A cancelled handle (its client went away) leaves the batch before the next decoding step.

With a ``compile_config`` the generation thread decodes on fixed cache slots with compiled graphs
(``ContinuousBatchDecoder(model, compile_config, slots=max_batch_size, context=compile_context)``, see
``modeling/slot_batching.py``): :meth:`ServingEngine.start` compiles every batch bucket before it returns (loading
and saving torch's compile cache around it when ``compile_cache`` is given), so the first requests never pay for
compilation; a request longer than ``compile_context`` positions is refused like any other length error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("fun_audio_chat.serving")

# Positions per cache slot of compiled decoding when none is given. Every slot allocates its whole LLM and Speech
# Refined Head cache up front, so the default covers the server's own limits (a 120 s clip is a few hundred LLM
# positions plus the template, a 256-token reply) with room for a short conversation, not the model's whole context
# (for the 8B model in bfloat16, 2048 positions are about 1.5 GB per slot; 262144 would be about 190 GB).
DEFAULT_COMPILE_CONTEXT = 2048


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
        voice: the voice the reply is spoken in (a voice object of the detokenizer); None = its default speaker.
    """

    messages: list[dict]
    speech: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tools: list[dict] | None = None
    voice: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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

    batch_size: int = 0  # most replies decoded together while this one was
    queue_seconds: float | None = None  # waiting for the generation thread (to the start of the prefill)
    prefill_seconds: float | None = None  # to the end of the prefill (the reply's first token is chosen)
    first_text_seconds: float | None = None  # to the first reply text token
    first_speech_seconds: float | None = None  # to the first real speech codes (after the speech-BOS delay)
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
        self.turn = None  # the SpokenTurn, once the generation thread has started the reply
        self.row_id: int | None = None
        self.speech_worker = 0  # the engine's speech thread that renders this turn's audio
        self.ended_cancelled = False  # the reply left the batch because it was cancelled

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
class ServingEngine:
    """Decodes turns through one model with continuous batching (see the module docstring).

    Args:
        model: a :class:`~fun_audio_chat.FunAudioChatForConditionalGeneration` in eval mode.
        processor: its :class:`~fun_audio_chat.FunAudioChatProcessor`.
        detokenizer: speech codes → audio (``sample_rate``, ``streaming_session()``, ``push_streams``); None = no
            audio (speech requests still get their text; :attr:`can_speak` is False).
        max_batch_size: most replies decoded together; later requests wait for a row to leave.
        batch_window: seconds the idle generation thread waits after a request arrives, so that requests sent at
            the same moment start on the same step (a busy thread never waits: new rows join at the next step).
        synthesis_workers: speech threads; each renders its own share of the speaking turns in batched calls. One
            worker uses one core's worth of synthesis (with ``torch.set_num_threads(1)``); on a machine with idle
            cores, more workers synthesise more concurrent replies per second (a single reply is not split).
        synthesis_hop_growth: each reply's synthesis hop is multiplied by this after every call (1: the official
            fixed hop of 15 codes; 2: 15, 30, 60, 100 codes): the first audio comes as early, and a reply costs
            about linear instead of quadratic flow work, so more replies fit per second
            (``streaming_session(hop_growth=...)``).
        generate_kwargs: extra ``generate`` keyword arguments for every turn (e.g. ``logits_processor``).
        chunked_synthesis: render audio with ``streaming_session(chunked=True)`` (CosyVoice's cached chunk-causal
            flow: each call computes only the new frames, so more replies fit per second; the first audio needs
            25 + 3 codes) instead of the official schedule (a call every 15 + 3 codes, each redoing the flow over
            the reply so far).
        compile_config: transformers' ``CompileConfig``: decode on ``max_batch_size`` fixed cache slots with the
            LLM step and the Speech Refined Head's sub-step compiled per batch bucket (1, 2, 4, ...,
            ``max_batch_size``); :meth:`start` compiles them all before it returns. None = the uncompiled decoder.
        compile_context: LLM positions (prompt + reply) of one slot, compiled decoding only; a request that needs
            more is refused. Every slot allocates its whole LLM and SRH cache for it up front
            (:attr:`slot_cache_bytes`). Default: ``DEFAULT_COMPILE_CONTEXT`` (2048), capped by the model's context.
        compile_cache: a file for torch's portable compile cache, compiled decoding only: loaded before the
            warm-up when it exists and saved after it, so the next start with the same torch version, model
            shapes and settings skips code generation.
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
        chunked_synthesis: bool = False,
        synthesis_workers: int = 1,
        synthesis_hop_growth: int = 1,
        compile_config=None,
        compile_context: int | None = None,
        compile_cache: str | Path | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        if synthesis_workers < 1:
            raise ValueError(f"synthesis_workers must be >= 1, got {synthesis_workers}.")
        self.compile_config = compile_config
        self.compile_context = self._compile_context(model, compile_config, compile_context, compile_cache)
        self.compile_cache = Path(compile_cache).expanduser() if compile_cache is not None else None
        if self.compile_cache is not None and self.compile_cache.exists() and not self.compile_cache.is_file():
            raise ValueError(f"compile_cache {str(compile_cache)!r} is not a file; pass a file path (e.g. cache.bin).")
        self.warm_up_seconds: dict[int, float] = {}  # compiled decoding: seconds per batch bucket at start
        # the start-up warm-up loaded a saved compile cache (False when none was given or torch could not read it)
        self.compile_cache_loaded = False
        self.model = model
        self.processor = processor
        self.detokenizer = detokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.extra_generate_kwargs = dict(generate_kwargs or {})
        self.chunked_synthesis = chunked_synthesis
        self.synthesis_hop_growth = synthesis_hop_growth
        self.on_turn_end = None  # callable(TurnHandle, TurnResult | None, BaseException | None), e.g. metrics
        self._pending: deque[TurnHandle] = deque()
        self._pending_lock = threading.Condition()
        # one job queue per speech worker, and its unfinished speaking turns (a new turn goes to the least busy)
        self._speech_jobs: list[queue.Queue] = [queue.Queue() for _ in range(synthesis_workers)]
        self._speech_turns: list[set[TurnHandle]] = [set() for _ in range(synthesis_workers)]
        self._ids = itertools.count(1)
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._decoding: dict[int, TurnHandle] = {}  # row id -> handle, generation thread only
        self.steps_run = 0  # decoding steps of the running batch, over the engine's life
        self.busy = threading.Event()  # set while rows are decoding
        self._decoder_ready = threading.Event()  # the generation thread has its decoder (compiled: warmed up)
        self._decoder_error: BaseException | None = None

    @staticmethod
    def _compile_context(model, compile_config, compile_context: int | None, compile_cache) -> int | None:
        """The positions of one cache slot (compiled decoding), checked; None without a compile config."""
        if compile_config is None:
            if compile_context is not None or compile_cache is not None:
                raise ValueError(
                    "compile_context and compile_cache apply to compiled decoding only; pass compile_config too "
                    "(e.g. transformers.CompileConfig()) or leave them out."
                )
            return None
        model_limit = int(model.config.text_config.max_position_embeddings)
        default = min(DEFAULT_COMPILE_CONTEXT, model_limit)
        if compile_context is None:
            return default
        if isinstance(compile_context, bool) or not isinstance(compile_context, int) or compile_context < 2:
            raise ValueError(
                "compile_context must be an integer >= 2 (LLM positions of one slot: the longest prompt plus reply "
                f"to serve), got {compile_context!r}; pass e.g. compile_context={default}."
            )
        if compile_context > model_limit:
            raise ValueError(
                f"compile_context {compile_context} exceeds the model's context of {model_limit} positions; pass "
                f"compile_context <= {model_limit}."
            )
        return compile_context

    # ------------------------------------------------------------------ properties
    @property
    def can_speak(self) -> bool:
        return self.detokenizer is not None and self.model.audio_invert_tower is not None

    @property
    def sample_rate(self) -> int | None:
        return getattr(self.detokenizer, "sample_rate", None) if self.detokenizer is not None else None

    @property
    def context_length(self) -> int:
        """Most LLM positions (prompt + reply) of one request: the model's context, or a compiled slot's."""
        if self.compile_context is not None:
            return self.compile_context
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def compiled(self) -> bool:
        """Decoding runs as compiled graphs on fixed cache slots (``compile_config`` was given)."""
        return self.compile_config is not None

    @property
    def slot_cache_bytes(self) -> int | None:
        """Bytes of cache one slot of compiled decoding allocates (LLM + Speech Refined Head; None uncompiled):
        ``max_batch_size`` times this is held for the engine's life, used or not."""
        if self.compile_context is None:
            return None
        from ..modeling.slot_batching import slot_cache_bytes

        return slot_cache_bytes(self.model, self.compile_context)

    def queue_depth(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ServingEngine:
        if self._threads:
            return self
        self._threads = [
            threading.Thread(target=self._generation_loop, daemon=True, name="fun-audio-chat-generation")
        ] + [
            threading.Thread(
                target=self._speech_loop, args=(worker,), daemon=True, name=f"fun-audio-chat-speech-{worker}"
            )
            for worker in range(len(self._speech_jobs))
        ]
        for thread in self._threads:
            thread.start()
        self._wait_for_decoder()
        return self

    def _wait_for_decoder(self) -> None:
        """Block until the generation thread has its decoder: with compiled decoding, until every batch bucket is
        compiled, so a server that starts the engine before it listens never makes a request wait for a compile."""
        self._decoder_ready.wait()
        if self._decoder_error is not None:
            error = self._decoder_error
            self.close()
            raise RuntimeError(f"the engine's decoder could not be built: {error}") from error

    def close(self) -> None:
        with self._pending_lock:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            self._pending_lock.notify_all()
        for handle in waiting:
            handle._emit(TurnFailed(RuntimeError("the server is shutting down")))
        for thread in self._threads[:1]:
            thread.join(timeout=30)
        for jobs in self._speech_jobs:
            jobs.put(None)
        for thread in self._threads[1:]:
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
        needed = prompt_length + request.max_new_tokens
        if self.compile_context is not None and needed > self.compile_context:
            raise ValueError(
                f"the request needs {prompt_length} prompt + {request.max_new_tokens} max_tokens = {needed} "
                f"positions, more than this server's compiled decoding context of {self.compile_context} positions "
                "per request; shorten the audio/conversation or lower max_tokens (the server's operator can raise "
                "serve --compile-context)."
            )

    def _template(self, request: TurnRequest):
        kwargs = {"tools": request.tools} if request.tools else {}
        return self.processor.apply_chat_template(
            [request.messages],
            add_generation_prompt=True,
            speech_output=request.speech,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **kwargs,
        )

    def _stop_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        ids.add(self.processor.im_end_token_id)
        return ids

    # ------------------------------------------------------------------ generation thread
    def _admit(self, running: bool) -> list[TurnHandle] | None:
        """The waiting requests that fit in the batch (None once the engine closes). Idle, it waits for a request
        and then ``batch_window``; running, it takes what is there without waiting."""
        with self._pending_lock:
            while not running and not self._pending and not self._closed:
                self._pending_lock.wait()
            if self._closed:
                return None
            idle_arrival = not running and bool(self._pending)
        if idle_arrival and self.batch_window > 0:
            time.sleep(self.batch_window)  # let requests sent at the same moment start together
        admitted = []
        with self._pending_lock:
            while self._pending and len(self._decoding) + len(admitted) < self.max_batch_size:
                handle = self._pending.popleft()
                if handle.cancelled.is_set():
                    handle._emit(TurnFailed(TurnCancelled("the client went away before the turn started")))
                else:
                    admitted.append(handle)
        return admitted

    def _generation_loop(self) -> None:
        import torch

        try:
            decoder = self._new_decoder(at_start=True)
        except BaseException as err:  # noqa: BLE001 - start() raises it in the thread that started the engine
            self._decoder_error = err
            self._decoder_ready.set()
            return
        self._decoder_ready.set()
        stop_ids = self._stop_token_ids()
        while True:
            admitted = self._admit(running=decoder.has_rows)
            if admitted is None:
                self._fail_decoding_rows(RuntimeError("the server is shutting down"))
                return
            for handle in admitted:
                self._start_row(decoder, handle, stop_ids)
            self._drop_cancelled_rows(decoder)
            if not decoder.has_rows:
                self.busy.clear()
                continue
            self.busy.set()
            try:
                with torch.inference_mode():
                    steps = decoder.step()
            except Exception as err:  # noqa: BLE001 - every row of the failed step fails; the engine goes on
                logger.warning("a decoding step of %d rows failed: %s", len(self._decoding), err)
                self._fail_decoding_rows(err)
                decoder = self._new_decoder()
                self.busy.clear()
                continue
            self.steps_run += 1
            self._deliver_steps(steps)
            if not decoder.has_rows:
                self.busy.clear()

    def _new_decoder(self, at_start: bool = False):
        """The generation thread's decoder. Compiled, it is warmed up before its first row: at start with the
        compile cache loaded first and saved after (the timings kept in :attr:`warm_up_seconds`); after a failed
        step the graphs are already compiled, so the new decoder's warm-up only checks them."""
        from ..modeling import ContinuousBatchDecoder

        if self.compile_config is None:
            return ContinuousBatchDecoder(self.model)
        decoder = ContinuousBatchDecoder(
            self.model, self.compile_config, slots=self.max_batch_size, context=self.compile_context
        )
        if at_start:
            self._warm_up_at_start(decoder)
            return decoder
        try:
            decoder.warm_up()
        except Exception as err:  # noqa: BLE001 - the graphs then compile on first use; the engine goes on
            logger.warning("re-warming the compiled decoder after a failed step failed: %s", err)
        return decoder

    def _warm_up_at_start(self, decoder) -> None:
        from ..modeling.compiled_decoding import load_compile_cache, save_compile_cache

        if self.compile_cache is not None:
            try:
                self.compile_cache_loaded = load_compile_cache(self.compile_cache)
            except Exception as err:  # noqa: BLE001 - a stale or foreign cache only costs a full compile
                logger.warning("compile cache %s not loaded (compiling from scratch): %s", self.compile_cache, err)
        started = time.perf_counter()
        self.warm_up_seconds = decoder.warm_up()
        logger.info(
            "compiled decoding: %d slots of %d positions (%.1f MB of cache each), warmed up in %.1f s (%s)%s",
            self.max_batch_size,
            self.compile_context,
            self.slot_cache_bytes / 1e6,
            time.perf_counter() - started,
            ", ".join(f"batch {size}: {seconds:.1f} s" for size, seconds in self.warm_up_seconds.items()),
            f", from compile cache {self.compile_cache}" if self.compile_cache_loaded else "",
        )
        if self.compile_cache is None:
            return
        try:
            saved = save_compile_cache(self.compile_cache)
        except OSError as err:
            logger.warning("compile cache %s could not be saved: %s", self.compile_cache, err)
            return
        if saved:
            logger.info("compile cache saved to %s", self.compile_cache)
        else:
            logger.info("no compile cache to save (backend %s makes no artifacts)", self.compile_config.backend)

    def _fail_decoding_rows(self, error: BaseException) -> None:
        """Every turn in the batch fails with ``error`` and leaves it."""
        for handle in list(self._decoding.values()):
            self._fail(handle, error)
        self._decoding.clear()

    def _drop_cancelled_rows(self, decoder) -> None:
        """Cancelled turns leave the batch before the next step."""
        for row_id, handle in list(self._decoding.items()):
            if handle.cancelled.is_set():
                decoder.cancel(row_id)
                del self._decoding[row_id]
                self._end_turn(handle, cancelled=True)

    def _deliver_steps(self, steps) -> None:
        """Hand each row's step to its turn; a finished row leaves the batch."""
        rows = len(steps)
        for step in steps:
            handle = self._decoding.get(step.row_id)
            if handle is None:
                continue
            self._deliver_step(handle, step, rows)
            if step.finished:
                del self._decoding[step.row_id]
                self._end_turn(handle)

    def _start_row(self, decoder, handle: TurnHandle, stop_ids: set[int]) -> None:
        from ..voice_chat import SpokenTurn

        request = handle.request
        started = time.perf_counter()
        handle.metrics.queue_seconds = started - handle.submitted_at
        try:
            inputs = self._template(request).to(self.model.device)
            prompt_length = int(inputs["input_ids"].shape[1])
            self._check_fits(prompt_length, request)
            kwargs = request.generate_kwargs()
            kwargs.update(self.extra_generate_kwargs)
            seed = request.seed if not request.greedy else None
            row_id = decoder.add(inputs, seed=seed, **kwargs)
        except Exception as err:  # noqa: BLE001 - this request fails alone; the batch goes on
            self._fail(handle, err)
            return
        handle.metrics.prefill_seconds = handle._since_submit()
        handle.metrics.prompt_tokens = prompt_length
        speaking = request.speech and self.can_speak
        handle.turn = SpokenTurn(
            self.processor,
            self.detokenizer if speaking else None,
            speech=request.speech,
            stop_token_ids=stop_ids,
            prompt_tokens=prompt_length,
            started_at=handle.submitted_at,
            render_audio=False,
            chunked=self.chunked_synthesis,
            voice=request.voice,
            hop_growth=self.synthesis_hop_growth,
        )
        handle.row_id = row_id
        if handle.turn.audio_session is not None:
            handle.speech_worker = self._least_busy_speech_worker()
            self._speech_turns[handle.speech_worker].add(handle)
        self._decoding[row_id] = handle

    def _least_busy_speech_worker(self) -> int:
        """The speech worker with the fewest unfinished turns (generation thread only)."""
        for turns in self._speech_turns:
            turns.difference_update([handle for handle in turns if handle.finished.is_set()])
        return min(range(len(self._speech_turns)), key=lambda worker: len(self._speech_turns[worker]))

    def _deliver_step(self, handle: TurnHandle, step, rows: int) -> None:
        from ..voice_chat import SpeechPiece, TextPiece

        handle.metrics.batch_size = max(handle.metrics.batch_size, rows)
        group = None if step.speech_group is None else step.speech_group.tolist()
        spoken = False
        for event in handle.turn.step(step.token_id, group):
            if isinstance(event, TextPiece) and event.text:
                handle._emit(TextDelta(event.text))
            elif isinstance(event, SpeechPiece):
                spoken = True
        if spoken and handle.turn.audio_session is not None:
            self._speech_jobs[handle.speech_worker].put((handle, False))

    def _end_turn(self, handle: TurnHandle, cancelled: bool = False) -> None:
        """The reply has left the batch: its audio tail and result come from the speech thread when it speaks."""
        if handle.turn.audio_session is not None:
            handle.ended_cancelled = cancelled
            self._speech_jobs[handle.speech_worker].put((handle, True))
        else:
            self._finish(handle, cancelled)

    def _fail(self, handle: TurnHandle, error: BaseException) -> None:
        if handle.finished.is_set():
            return
        logger.info("turn %d failed: %s", handle.request_id, error)
        if self.on_turn_end is not None:
            self.on_turn_end(handle, None, error)
        handle._emit(TurnFailed(error))

    def _finish(self, handle: TurnHandle, cancelled: bool) -> None:
        """End the handle's turn (:meth:`SpokenTurn.finish`) and answer it."""
        from ..voice_chat import AudioPiece, TurnEnd

        spoken = None
        for event in handle.turn.finish(cancelled=cancelled):
            if isinstance(event, AudioPiece):
                self._emit_audio(handle, event.audio)
            elif isinstance(event, TurnEnd):
                spoken = event.result
        metrics = handle.metrics
        metrics.completion_tokens = spoken.metrics.completion_tokens
        metrics.first_speech_seconds = spoken.metrics.first_speech_seconds
        metrics.total_seconds = handle._since_submit()
        audio = None
        if spoken.audio is not None:
            audio = np.ascontiguousarray(spoken.audio.numpy(), dtype=np.float32)
        result = TurnResult(
            text=spoken.text,
            codes=spoken.codes,
            audio=audio,
            sample_rate=self.sample_rate if audio is not None else None,
            finish_reason=spoken.finish_reason,
            metrics=metrics,
        )
        if self.on_turn_end is not None:
            self.on_turn_end(handle, result, None)
        handle._emit(TurnDone(result))

    # ------------------------------------------------------------------ speech thread
    def _speech_loop(self, worker: int) -> None:
        """Renders the codes of this worker's speaking turns with ``detokenizer.push_streams``, one round (at most
        one flow call per turn) per tick. A tick serves the turns still waiting for their first audio alone when any
        of them has a call due, so a new reply's first audio never waits behind the backlog of the others (the LLM
        runs far ahead of synthesis); otherwise it advances every turn with work, in one batch."""
        import torch

        jobs = self._speech_jobs[worker]
        active: dict[int, list] = {}  # request id -> [handle, its reply has ended]
        closing = False
        while not (closing and not active):
            busy = any(self._has_audio_work(handle, ended) for handle, ended in active.values())
            block = not busy and not closing
            while True:
                try:
                    job = jobs.get(block=block)
                except queue.Empty:
                    break
                block = False
                if job is None:
                    closing = True
                    continue
                handle, ended = job
                entry = active.setdefault(handle.request_id, [handle, False])
                entry[1] = entry[1] or ended
            ready = []
            for handle, ended in list(active.values()):
                if handle.finished.is_set():
                    del active[handle.request_id]
                elif handle.cancelled.is_set() or handle.turn.finished:
                    if ended:  # a cancelled reply renders nothing more; it ends once it has left the batch
                        del active[handle.request_id]
                        self._finish_after_audio(handle)
                else:
                    handle.turn.audio_session.add_codes(handle.turn.take_codes_to_render())
                    if self._has_audio_work(handle, ended):
                        ready.append((handle, ended))
            if not ready:
                continue
            first_audio = [(h, e) for h, e in ready if h.metrics.first_audio_seconds is None]
            tick = first_audio if any(self._has_audio_work(h, e) for h, e in first_audio) else ready
            try:
                with torch.inference_mode():
                    rendered = self.detokenizer.push_streams(
                        [(h.turn.audio_session, (), e) for h, e in tick], max_rounds=1
                    )
                for (handle, _), samples in zip(tick, rendered):
                    for event in handle.turn.add_audio(samples):
                        self._emit_audio(handle, event.audio)
                    if handle.turn.audio_session.finished:
                        del active[handle.request_id]
                        self._finish_after_audio(handle)
            except Exception as err:  # noqa: BLE001 - these turns fail, the others go on
                for handle, _ in tick:
                    active.pop(handle.request_id, None)
                    self._fail(handle, RuntimeError(f"speech synthesis failed: {err}"))

    @staticmethod
    def _has_audio_work(handle: TurnHandle, ended: bool) -> bool:
        session = handle.turn.audio_session
        if handle.cancelled.is_set() or session.finished:
            return False
        return ended or session.has_due_calls

    def _finish_after_audio(self, handle: TurnHandle) -> None:
        if not handle.finished.is_set():
            self._finish(handle, handle.ended_cancelled or handle.cancelled.is_set())

    def _emit_audio(self, handle: TurnHandle, samples) -> None:
        if samples is None:
            return
        array = samples.detach().cpu().float().numpy() if hasattr(samples, "detach") else np.asarray(samples)
        array = np.ascontiguousarray(array.reshape(-1), dtype=np.float32)
        if array.size == 0:
            return
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
