"""Per-turn metrics of a voice agent, logged and exposed at ``/metrics``.

For each finished turn: time from the request's arrival (the end of the user's speech, for the voice page) to the
first reply text token and to the first audio chunk, the real-time factor of the reply's audio, the time spent
waiting for a batch and the batch size. ``/metrics`` serves them in the Prometheus text format, written by
``prometheus_client`` (histograms, counters and gauges in a registry of this server's own);
``/metrics?format=json`` returns counters, the median and p95 over the last turns, and the last turns as JSON.

For Realtime API turns (``/v1/realtime``) it also records where the time from the end of the user's turn to the
first reply audio went (:meth:`ServingMetrics.record_realtime_turn`), as Prometheus histograms:

* ``vad_wait`` — end of the user's speech (arrival of its last voiced audio) → the turn detector's
  ``speech_stopped`` (the silence it waits for, plus scoring time); absent for manually committed turns;
* ``turn_end_to_submit`` — ``speech_stopped`` (or the client's commit / ``response.create``) → the turn reaches the
  engine (building the conversation);
* ``queue_prefill`` — engine submit → end of the reply's prefill (waiting for room in the batch, templating, the
  prefill that chooses the first token);
* ``first_speech_group`` — end of the prefill → the first group of real speech codes (the speech-BOS delay steps:
  the released model opens every spoken reply with 10 delay codes, two decoding steps);
* ``first_audio_chunk`` — first real speech codes → the first reply audio chunk rendered (synthesis, which needs
  the flow's look-ahead codes);
* ``turn_end_to_first_audio`` — end of the user's speech (or commit) → the first audio delta sent to the client.

plus Realtime counters: sessions opened, closed for idling, responses by final status, error events sent.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import TurnHandle, TurnResult

logger = logging.getLogger("fun_audio_chat.serving")

# upper bounds of the latency histograms' buckets (seconds)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_TURN_HISTOGRAMS = {  # name: (help, bucket upper bounds)
    "first_text_seconds": ("Seconds from request arrival to the first reply text token", LATENCY_BUCKETS),
    "first_audio_seconds": ("Seconds from request arrival to the first reply audio chunk", LATENCY_BUCKETS),
    "real_time_factor": (
        "Decoding + synthesis time divided by the reply audio duration",
        (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
    ),
    "queue_seconds": ("Seconds a request waited for room in the running batch", LATENCY_BUCKETS),
    "prefill_seconds": ("Seconds from request arrival to the end of its prefill", LATENCY_BUCKETS),
    "first_speech_seconds": ("Seconds from request arrival to the first real speech codes", LATENCY_BUCKETS),
    "total_seconds": ("Seconds from request arrival to the end of the reply", LATENCY_BUCKETS + (30.0, 60.0)),
    "batch_size": ("Most replies decoded together while the turn was", (1, 2, 4, 8, 16, 32, 64)),
}
_TURN_COUNTERS = {
    "turns_completed": "Turns answered to their end",
    "turns_failed": "Turns that failed",
    "turns_cancelled": "Turns cancelled before their end (client gone, barge-in)",
    "audio_seconds": "Seconds of reply audio synthesized",
    "completion_tokens": "Reply tokens generated",
    "bad_requests": "Requests refused as malformed",
}
_REALTIME_HISTOGRAMS = {
    "vad_wait": "End of user speech to speech_stopped (turn detection delay), seconds",
    "turn_end_to_submit": "speech_stopped or client commit to engine submit, seconds",
    "queue_prefill": "Engine submit to the end of the reply's prefill (queue + prefill), seconds",
    "first_speech_group": "End of prefill to the first real speech codes (speech-BOS delay steps), seconds",
    "first_audio_chunk": "First real speech codes to the first reply audio chunk (synthesis), seconds",
    "turn_end_to_first_audio": "End of user speech (or commit) to first reply audio sent, seconds",
}
_REALTIME_COUNTERS = {
    "sessions_opened": "Realtime sessions opened",
    "sessions_idle_closed": "Realtime sessions closed for idling",
    "error_events": "Realtime error events sent",
    "responses_completed": "Realtime responses completed",
    "responses_cancelled": "Realtime responses cancelled",
    "responses_incomplete": "Realtime responses cut short (max_output_tokens)",
    "responses_failed": "Realtime responses that failed",
}


def _median_p95(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "median": None, "p95": None}
    if len(values) == 1:
        return {"count": 1, "median": values[0], "p95": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # cut points 1..99 %
    return {"count": len(values), "median": statistics.median(values), "p95": cuts[94]}


class ServingMetrics:
    """Collects finished turns (connect :meth:`record` to ``ServingEngine.on_turn_end``).

    The Prometheus series live in :attr:`registry`, a registry of this instance's own (not the process-wide
    default), so several servers (or tests) in one process never share or clash on series."""

    def __init__(self, window: int = 1000):
        self.started_at = time.time()
        self.turns: deque[dict] = deque(maxlen=window)
        self.realtime_turns: deque[dict] = deque(maxlen=window)
        self.registry = CollectorRegistry()
        self._counters = {
            name: Counter(f"fun_audio_chat_{name}", help_text, registry=self.registry)
            for name, help_text in _TURN_COUNTERS.items()
        }
        self._turn_histograms = {
            name: Histogram(f"fun_audio_chat_turn_{name}", help_text, buckets=buckets, registry=self.registry)
            for name, (help_text, buckets) in _TURN_HISTOGRAMS.items()
        }
        self._queue_depth = Gauge("fun_audio_chat_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self._realtime_counters = {
            name: Counter(f"fun_audio_chat_realtime_{name}", help_text, registry=self.registry)
            for name, help_text in _REALTIME_COUNTERS.items()
        }
        self._realtime_histograms = {
            name: Histogram(
                f"fun_audio_chat_realtime_{name}_seconds", help_text, buckets=LATENCY_BUCKETS, registry=self.registry
            )
            for name, help_text in _REALTIME_HISTOGRAMS.items()
        }
        self._realtime_sessions = Gauge(
            "fun_audio_chat_realtime_sessions_active", "Open Realtime API sessions", registry=self.registry
        )
        self._lock = threading.Lock()  # guards the recent-turn windows

    def record(self, handle: TurnHandle, result: TurnResult | None, error: BaseException | None) -> None:
        metrics = handle.metrics
        if error is not None:
            self._counters["turns_failed"].inc()
            return
        name = "turns_cancelled" if result.finish_reason == "cancelled" else "turns_completed"
        self._counters[name].inc()
        self._counters["audio_seconds"].inc(metrics.audio_seconds)
        self._counters["completion_tokens"].inc(metrics.completion_tokens)
        turn = {
            "id": handle.request_id,
            "finish_reason": result.finish_reason,
            "speech": handle.request.speech,
            "batch_size": metrics.batch_size,
            "queue_seconds": metrics.queue_seconds,
            "prefill_seconds": metrics.prefill_seconds,
            "first_text_seconds": metrics.first_text_seconds,
            "first_speech_seconds": metrics.first_speech_seconds,
            "first_audio_seconds": metrics.first_audio_seconds,
            "total_seconds": metrics.total_seconds,
            "audio_seconds": metrics.audio_seconds,
            "real_time_factor": metrics.real_time_factor,
            "prompt_tokens": metrics.prompt_tokens,
            "completion_tokens": metrics.completion_tokens,
        }
        for field, histogram in self._turn_histograms.items():
            if turn[field] is not None:
                histogram.observe(turn[field])
        with self._lock:
            self.turns.append(turn)
        logger.info(
            "turn %d: %s, batch %d, queued %.3f s, first text %s, first audio %s, %.2f s audio, RTF %s",
            handle.request_id,
            result.finish_reason,
            metrics.batch_size,
            metrics.queue_seconds or 0.0,
            _seconds(metrics.first_text_seconds),
            _seconds(metrics.first_audio_seconds),
            metrics.audio_seconds,
            f"{metrics.real_time_factor:.3f}" if metrics.real_time_factor is not None else "-",
        )

    def count_bad_request(self) -> None:
        self._counters["bad_requests"].inc()

    # ------------------------------------------------------------------ Realtime API
    def realtime_session_opened(self) -> None:
        self._realtime_counters["sessions_opened"].inc()
        self._realtime_sessions.inc()

    def realtime_session_closed(self, idle: bool = False) -> None:
        self._realtime_sessions.dec()
        if idle:
            self._realtime_counters["sessions_idle_closed"].inc()

    def count_realtime_error(self) -> None:
        self._realtime_counters["error_events"].inc()

    def record_realtime_turn(self, status: str, latency: dict[str, float | None]) -> None:
        """One finished Realtime response: its final status (completed, cancelled, incomplete, failed) and its
        latency split (keys of the module docstring's list, in seconds; None = not measured for this turn)."""
        unknown = set(latency) - set(_REALTIME_HISTOGRAMS)
        if unknown:
            raise ValueError(
                f"unknown realtime latency field(s) {sorted(unknown)}; known: {sorted(_REALTIME_HISTOGRAMS)}"
            )
        counter = self._realtime_counters.get(f"responses_{status}")
        if counter is not None:
            counter.inc()
        for name, value in latency.items():
            if value is not None:
                self._realtime_histograms[name].observe(value)
        with self._lock:
            self.realtime_turns.append({"status": status, **latency})
        logger.info(
            "realtime response %s: %s",
            status,
            ", ".join(f"{name} {_seconds(value)}" for name, value in latency.items()),
        )

    # ------------------------------------------------------------------ reading
    def summary(self) -> dict:
        """Counters, the median and p95 of each per-turn time over the last turns, and the last turns."""
        with self._lock:
            turns = list(self.turns)
            realtime_turns = list(self.realtime_turns)
        latency = {}
        for name in _REALTIME_HISTOGRAMS:
            values = [turn[name] for turn in realtime_turns if turn.get(name) is not None]
            latency[name] = {**_median_p95(values), "sum": sum(values)}
        return {
            "uptime_seconds": time.time() - self.started_at,
            "counters": {name: _value(counter) for name, counter in self._counters.items()},
            "summaries": {
                name: _median_p95([turn[name] for turn in turns if turn.get(name) is not None])
                for name in _TURN_HISTOGRAMS
            },
            "recent_turns": turns[-20:],
            "realtime": {
                "counters": {name: _value(counter) for name, counter in self._realtime_counters.items()},
                "sessions_active": _value(self._realtime_sessions),
                "latency": latency,
                "recent_turns": realtime_turns[-20:],
            },
        }

    content_type = CONTENT_TYPE_LATEST  # of :meth:`prometheus`'s text

    def prometheus(self, queue_depth: int = 0) -> str:
        """The Prometheus text exposition of every series (``queue_depth``: the engine's waiting requests now)."""
        self._queue_depth.set(queue_depth)
        return generate_latest(self.registry).decode("utf-8")


def _value(metric) -> float:
    """The current value of an unlabelled counter or gauge (its first sample)."""
    return metric.collect()[0].samples[0].value


def _seconds(value: float | None) -> str:
    return f"{value:.3f} s" if value is not None else "-"


__all__ = ["ServingMetrics"]
