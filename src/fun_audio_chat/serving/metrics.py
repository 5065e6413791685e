"""Per-turn metrics of a voice agent, logged and exposed at ``/metrics``.

For each finished turn: time from the request's arrival (the end of the user's speech, for the voice page) to the
first reply text token and to the first audio chunk, the real-time factor of the reply's audio, the time spent
waiting for a batch and the batch size. ``/metrics`` serves them in the Prometheus text format (summaries with
median and p95 over the last turns, plus counters); ``/metrics?format=json`` returns the same numbers and the last
turns as JSON.
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
    "queue_seconds": "Seconds a request waited for its batch",
    "total_seconds": "Seconds from request arrival to the end of the reply",
    "batch_size": "Rows of the generate call that decoded the turn",
}


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
                "first_text_seconds": metrics.first_text_seconds,
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
        return {
            "uptime_seconds": time.time() - self.started_at,
            "counters": counters,
            "summaries": summaries,
            "recent_turns": turns[-20:],
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
        return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return f"{value:.3f} s" if value is not None else "-"


__all__ = ["ServingMetrics"]
