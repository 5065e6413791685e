"""Server-side turn detection for the Realtime API: silero-vad speech probabilities plus a start/stop rule.

:class:`SpeechTurnDetector` takes 16 kHz float audio in pieces of any size, scores it in silero-vad's 512-sample
(32 ms) frames and reports :class:`SpeechStarted` when a frame's speech probability reaches ``threshold`` and
:class:`SpeechStopped` once the probability has stayed below ``threshold - 0.15`` for ``silence_duration_ms`` (the
lower exit threshold keeps a wavering probability from ending a turn; silero's own ``VADIterator`` uses the same
margin). Positions are in samples since the detector started, so the caller can cut its audio buffer at them.

The silero model (``pip install silero-vad``; the package ships its weights, nothing is downloaded) keeps a
recurrent state, so every detector owns one model instance (loading one takes ~50 ms).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # the frame size silero-vad takes at 16 kHz
EXIT_MARGIN = 0.15  # a frame counts as silence below threshold - EXIT_MARGIN

_IMPORT_LOCK = threading.Lock()


class VADUnavailableError(RuntimeError):
    """silero-vad is not installed."""


def load_silero_model():
    """A fresh silero-vad model (TorchScript, bundled with the package).

    Importing ``silero_vad`` calls ``torch.set_num_threads(1)`` for the whole process, which would halve the
    model's decoding speed on a 2-core server; the thread count is put back after the import.
    """
    import torch

    with _IMPORT_LOCK:
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        except ImportError as err:
            raise VADUnavailableError(
                "server-side turn detection needs silero-vad: pip install 'fun-audio-chat[serve]' "
                "(or pip install silero-vad), or turn it off with turn_detection: null."
            ) from err
        finally:
            torch.set_num_threads(threads)
    return load_silero_vad()


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
        starts and stops it completes, in order."""
        import torch

        # every frame scored now ends inside this piece, so its audio was complete when this piece arrived
        arrived_at = time.perf_counter() if arrived_at is None else arrived_at
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
]
