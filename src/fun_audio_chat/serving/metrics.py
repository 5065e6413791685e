"""Per-turn metrics of a voice agent, logged and exposed at ``/metrics``.

For each finished turn: time from the request's arrival (the end of the user's speech, for the voice page) to the
first reply text token and to the first audio chunk, the real-time factor of the reply's audio, the time spent
waiting for a batch and the batch size. ``/metrics`` serves them in the Prometheus text format (summaries with
median and p95 over the last turns, plus counters); ``/metrics?format=json`` returns the same numbers and the last
turns as JSON.

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
import threading
import time
from collections import deque

from .engine import TurnHandle, TurnResult

logger = logging.getLogger("fun_audio_chat.serving")

_SUMMARIES = {
    "first_text_seconds": "Seconds from request arrival to the first reply text token",
    "first_audio_seconds": "Seconds from request arrival to the first reply audio chunk",
    "real_time_factor": "Decoding + synthesis time divided by the reply audio duration",
    "queue_seconds": "Seconds a request waited for room in the running batch",
    "prefill_seconds": "Seconds from request arrival to the end of its prefill",
    "first_speech_seconds": "Seconds from request arrival to the first real speech codes",
    "total_seconds": "Seconds from request arrival to the end of the reply",
    "batch_size": "Most replies decoded together while the turn was",
}


_REALTIME_HISTOGRAMS = {
    "vad_wait": "End of user speech to speech_stopped (turn detection delay), seconds",
    "turn_end_to_submit": "speech_stopped or client commit to engine submit, seconds",
    "queue_prefill": "Engine submit to the end of the reply's prefill (queue + prefill), seconds",
    "first_speech_group": "End of prefill to the first real speech codes (speech-BOS delay steps), seconds",
    "first_audio_chunk": "First real speech codes to the first reply audio chunk (synthesis), seconds",
    "turn_end_to_first_audio": "End of user speech (or commit) to first reply audio sent, seconds",
}
# upper bounds of the latency histograms' buckets (seconds)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _Histogram:
    """A cumulative Prometheus histogram (bucket counts, sum, count)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1

    def lines(self, metric: str, help_text: str) -> list[str]:
        lines = [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
        for bound, count in zip(self.bounds, self.counts):
            lines.append(f'{metric}_bucket{{le="{bound:g}"}} {count}')
        lines += [
            f'{metric}_bucket{{le="+Inf"}} {self.count}',
            f"{metric}_sum {self.total:.6g}",
            f"{metric}_count {self.count}",
        ]
        return lines


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ServingMetrics:
    """Collects finished turns (connect :meth:`record` to ``ServingEngine.on_turn_end``)."""

    def __init__(self, window: int = 1000):
        self.started_at = time.time()
        self.turns: deque[dict] = deque(maxlen=window)
        self.counters = {
            "turns_completed": 0,
            "turns_failed": 0,
            "turns_cancelled": 0,
            "audio_seconds": 0.0,
            "completion_tokens": 0,
            "bad_requests": 0,
        }
        self.realtime_turns: deque[dict] = deque(maxlen=window)
        self.realtime_histograms = {name: _Histogram() for name in _REALTIME_HISTOGRAMS}
        self.realtime_counters = {
            "sessions_opened": 0,
            "sessions_idle_closed": 0,
            "error_events": 0,
            "responses_completed": 0,
            "responses_cancelled": 0,
            "responses_incomplete": 0,
            "responses_failed": 0,
        }
        self.realtime_sessions_active = 0
        self._lock = threading.Lock()

    def record(self, handle: TurnHandle, result: TurnResult | None, error: BaseException | None) -> None:
        metrics = handle.metrics
        with self._lock:
            if error is not None:
                self.counters["turns_failed"] += 1
                return
            if result.finish_reason == "cancelled":
                self.counters["turns_cancelled"] += 1
            else:
                self.counters["turns_completed"] += 1
            self.counters["audio_seconds"] += metrics.audio_seconds
            self.counters["completion_tokens"] += metrics.completion_tokens
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
        with self._lock:
            self.counters["bad_requests"] += 1

    # ------------------------------------------------------------------ Realtime API
    def realtime_session_opened(self) -> None:
        with self._lock:
            self.realtime_counters["sessions_opened"] += 1
            self.realtime_sessions_active += 1

    def realtime_session_closed(self, idle: bool = False) -> None:
        with self._lock:
            self.realtime_sessions_active -= 1
            if idle:
                self.realtime_counters["sessions_idle_closed"] += 1

    def count_realtime_error(self) -> None:
        with self._lock:
            self.realtime_counters["error_events"] += 1

    def record_realtime_turn(self, status: str, latency: dict[str, float | None]) -> None:
        """One finished Realtime response: its final status (completed, cancelled, incomplete, failed) and its
        latency split (keys of the module docstring's list, in seconds; None = not measured for this turn)."""
        unknown = set(latency) - set(_REALTIME_HISTOGRAMS)
        if unknown:
            raise ValueError(
                f"unknown realtime latency field(s) {sorted(unknown)}; known: {sorted(_REALTIME_HISTOGRAMS)}"
            )
        with self._lock:
            key = f"responses_{status}"
            if key in self.realtime_counters:
                self.realtime_counters[key] += 1
            for name, value in latency.items():
                if value is not None:
                    self.realtime_histograms[name].observe(value)
            self.realtime_turns.append({"status": status, **latency})
        logger.info(
            "realtime response %s: %s",
            status,
            ", ".join(f"{name} {_seconds(value)}" for name, value in latency.items()),
        )

    def summary(self) -> dict:
        with self._lock:
            turns = list(self.turns)
            counters = dict(self.counters)
        summaries = {}
        for name in _SUMMARIES:
            values = [turn[name] for turn in turns if turn.get(name) is not None]
            summaries[name] = {
                "count": len(values),
                "median": _quantile(values, 0.5) if values else None,
                "p95": _quantile(values, 0.95) if values else None,
            }
        with self._lock:
            realtime_turns = list(self.realtime_turns)
            realtime = {
                "counters": dict(self.realtime_counters),
                "sessions_active": self.realtime_sessions_active,
                "latency": {
                    name: {"count": histogram.count, "sum": histogram.total}
                    for name, histogram in self.realtime_histograms.items()
                },
            }
        for name in _REALTIME_HISTOGRAMS:
            values = [turn[name] for turn in realtime_turns if turn.get(name) is not None]
            realtime["latency"][name]["median"] = _quantile(values, 0.5) if values else None
            realtime["latency"][name]["p95"] = _quantile(values, 0.95) if values else None
        realtime["recent_turns"] = realtime_turns[-20:]
        return {
            "uptime_seconds": time.time() - self.started_at,
            "counters": counters,
            "summaries": summaries,
            "recent_turns": turns[-20:],
            "realtime": realtime,
        }

    def prometheus(self, queue_depth: int = 0) -> str:
        data = self.summary()
        lines = []
        for name, value in data["counters"].items():
            metric = f"fun_audio_chat_{name}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {value:g}"]
        lines += [
            "# HELP fun_audio_chat_queue_depth Requests waiting for a batch",
            "# TYPE fun_audio_chat_queue_depth gauge",
            f"fun_audio_chat_queue_depth {queue_depth}",
        ]
        for name, help_text in _SUMMARIES.items():
            metric = f"fun_audio_chat_turn_{name}"
            stats = data["summaries"][name]
            lines += [f"# HELP {metric} {help_text} (over the last turns)", f"# TYPE {metric} summary"]
            for quantile, key in (("0.5", "median"), ("0.95", "p95")):
                if stats[key] is not None:
                    lines.append(f'{metric}{{quantile="{quantile}"}} {stats[key]:.6g}')
            lines.append(f"{metric}_count {stats['count']}")
        with self._lock:
            for name, value in self.realtime_counters.items():
                metric = f"fun_audio_chat_realtime_{name}_total"
                lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
            lines += [
                "# HELP fun_audio_chat_realtime_sessions_active Open Realtime API sessions",
                "# TYPE fun_audio_chat_realtime_sessions_active gauge",
                f"fun_audio_chat_realtime_sessions_active {self.realtime_sessions_active}",
            ]
            for name, help_text in _REALTIME_HISTOGRAMS.items():
                lines += self.realtime_histograms[name].lines(f"fun_audio_chat_realtime_{name}_seconds", help_text)
        return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return f"{value:.3f} s" if value is not None else "-"


__all__ = ["ServingMetrics"]
