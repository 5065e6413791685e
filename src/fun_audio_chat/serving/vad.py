"""Server-side turn detection for the Realtime API: silero-vad speech probabilities plus a start/stop rule.

:class:`SpeechTurnDetector` takes 16 kHz float audio in pieces of any size, scores it in silero-vad's 512-sample
(32 ms) frames and reports :class:`SpeechStarted` when a frame's speech probability reaches ``threshold`` and
:class:`SpeechStopped` once the probability has stayed below ``threshold - 0.15`` for ``silence_duration_ms`` (the
lower exit threshold keeps a wavering probability from ending a turn; silero's own ``VADIterator`` uses the same
margin). Positions are in samples since the detector started, so the caller can cut its audio buffer at them.

The silero model (``pip install silero-vad``; the package ships its weights, nothing is downloaded) keeps a
recurrent state, so every detector owns one model instance (loading one takes ~50 ms).

Threads: silero scores one 32 ms frame at a time, and such tiny operations run *slower* with more torch threads
(measured here with 2 threads on 2 busy cores: ~150 ms per frame instead of ~1 ms, slower than real time). Torch's
thread count is per OS thread (a new thread starts with the last value set anywhere), so every silero model runs
on one dedicated worker thread set to 1 torch thread (:func:`vad_worker`), and the process default is put back at
once, so the model's decoding threads keep all cores.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# silero-vad's own input rate (the model takes 8 or 16 kHz, in 256- or 512-sample frames), not the chat model's:
# the two happen to agree, which lets the Realtime session feed the model's 16 kHz buffer to the detector unchanged.
SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # the frame size silero-vad takes at 16 kHz
EXIT_MARGIN = 0.15  # a frame counts as silence below threshold - EXIT_MARGIN

_WORKER: ThreadPoolExecutor | None = None
_WORKER_THREAD: list[threading.Thread] = []
_WORKER_LOCK = threading.Lock()


class VADUnavailableError(RuntimeError):
    """silero-vad is not installed."""


def _prepare_worker_thread() -> None:
    import torch

    # torch sets a thread's count from the process default at the thread's first parallel use, which would undo
    # the setting below once the default is restored: trigger that first use now
    torch.get_num_threads()
    torch.set_num_threads(1)
    _WORKER_THREAD.append(threading.current_thread())
    try:
        import silero_vad  # noqa: F401 - its import sets 1 torch thread as well: let it happen here
    except ImportError as err:
        raise VADUnavailableError(
            "server-side turn detection needs silero-vad: pip install 'fun-audio-chat[serve]' "
            "(or pip install silero-vad), or turn it off with turn_detection: null."
        ) from err


def vad_worker() -> ThreadPoolExecutor:
    """The one thread that runs every silero model, with 1 torch thread (see the module docstring)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            import torch

            process_default = torch.get_num_threads()
            worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fun-audio-chat-vad")
            try:
                worker.submit(_prepare_worker_thread).result()
            except BaseException:
                worker.shutdown(wait=False)
                raise
            finally:
                # the worker's setting became the default for threads started later: put the default back (this
                # thread already runs with process_default, the worker keeps its 1 thread)
                torch.set_num_threads(process_default)
            _WORKER = worker
    return _WORKER


def _on_worker(function, *args):
    """Run ``function`` on the VAD worker and wait for it (inline when already there)."""
    if threading.current_thread() in _WORKER_THREAD:
        return function(*args)
    return vad_worker().submit(function, *args).result()


def load_silero_model():
    """A fresh silero-vad model (TorchScript, bundled with the package), loaded on the VAD worker."""

    def load():
        from silero_vad import load_silero_vad

        return load_silero_vad()

    return _on_worker(load)


def vad_available() -> bool:
    """Whether silero-vad is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("silero_vad") is not None


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # first sample of the frame where speech began
    at: float  # perf_counter time when that frame's audio arrived


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # end of the last voiced frame
    at: float  # perf_counter time when the last voiced frame's audio arrived
    detected_at: float  # perf_counter time when the silence rule fired


class SpeechTurnDetector:
    """Speech start/stop events from streamed 16 kHz audio (see the module docstring).

    Args:
        threshold: speech probability (0-1) at which a frame counts as speech.
        silence_duration_ms: silence after speech that ends the turn.
        model: a silero-vad model to use (default: a fresh one from :func:`load_silero_model`).
    """

    def __init__(self, threshold: float = 0.5, silence_duration_ms: int = 500, model=None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}.")
        if silence_duration_ms < 0:
            raise ValueError(f"silence_duration_ms must be >= 0, got {silence_duration_ms}.")
        self.threshold = threshold
        self.silence_samples = int(silence_duration_ms * SAMPLE_RATE / 1000)
        self.model = model if model is not None else load_silero_model()
        self.reset()

    def reset(self) -> None:
        """Forget all audio and start counting samples from 0 again."""
        self.model.reset_states()
        self._pending = np.zeros(0, dtype=np.float32)  # less than a frame, waiting for more audio
        self.samples_seen = 0  # samples scored so far
        self.in_speech = False
        self._last_voiced_end = 0
        self._last_voiced_at = 0.0

    def feed(self, samples: np.ndarray, arrived_at: float | None = None) -> list[SpeechStarted | SpeechStopped]:
        """Score new audio (``arrived_at``: when it was received, ``perf_counter`` time); returns the speech
        starts and stops it completes, in order. Blocks until the VAD worker has scored it."""
        arrived_at = time.perf_counter() if arrived_at is None else arrived_at
        return _on_worker(self._score, samples, arrived_at)

    async def feed_async(
        self, samples: np.ndarray, arrived_at: float | None = None
    ) -> list[SpeechStarted | SpeechStopped]:
        """:meth:`feed` for a coroutine: the event loop goes on while the VAD worker scores."""
        arrived_at = time.perf_counter() if arrived_at is None else arrived_at
        return await asyncio.wrap_future(vad_worker().submit(self._score, samples, arrived_at))

    def _score(self, samples: np.ndarray, arrived_at: float) -> list[SpeechStarted | SpeechStopped]:
        import torch

        # every frame scored now ends inside this piece, so its audio was complete when this piece arrived
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, samples])
        events: list[SpeechStarted | SpeechStopped] = []
        with torch.inference_mode():
            while len(self._pending) >= FRAME_SAMPLES:
                frame, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
                start = self.samples_seen
                probability = float(self.model(torch.from_numpy(np.ascontiguousarray(frame)), SAMPLE_RATE))
                self.samples_seen += FRAME_SAMPLES
                if probability >= self.threshold:
                    if not self.in_speech:
                        self.in_speech = True
                        events.append(SpeechStarted(sample=start, at=arrived_at))
                    self._last_voiced_end, self._last_voiced_at = self.samples_seen, arrived_at
                elif not self.in_speech:
                    continue
                elif probability >= self.threshold - EXIT_MARGIN:
                    # between the two thresholds: still part of the speech
                    self._last_voiced_end, self._last_voiced_at = self.samples_seen, arrived_at
                elif self.samples_seen - self._last_voiced_end >= self.silence_samples:
                    self.in_speech = False
                    events.append(
                        SpeechStopped(
                            sample=self._last_voiced_end, at=self._last_voiced_at, detected_at=time.perf_counter()
                        )
                    )
        return events


__all__ = [
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "SpeechStarted",
    "SpeechStopped",
    "SpeechTurnDetector",
    "VADUnavailableError",
    "load_silero_model",
    "vad_available",
    "vad_worker",
]
