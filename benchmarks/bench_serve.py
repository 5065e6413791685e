"""``fun-audio-chat serve`` under load: time to first audio chunk and throughput with 1, 4 and 8 concurrent clients.

Starts ``fun-audio-chat serve`` (the tiny built-in model and the tiny random detokenizer, CPU) as a subprocess on
127.0.0.1, then for each client count runs ``--rounds`` rounds in which every client sends the same spoken question
(the bundled clip) at the same moment as a streamed request with spoken reply (pcm16, greedy, ``--max-tokens``
LLM steps). Requests that arrive together are decoded as one batch by the server, so the ratios against one client
show what batching buys: throughput (reply audio seconds produced per wall-clock second, and replies per second)
and what it costs (time to the first audio chunk, median and p95 over all requests). A second table does the same
with text-only replies (time to the first text token, reply tokens per second): the LLM's batching gain without
speech synthesis, which runs one streaming detokenizer session per reply and bounds the spoken throughput.

Usage: python benchmarks/bench_serve.py [--clients 1 4 8] [--rounds 3] [--max-tokens 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

SAMPLE_RATE = 24000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _one_request(url: str, body: bytes) -> dict:
    """One streamed reply: seconds to the first text piece, to the first audio piece, to the end; audio duration."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first_audio = first_text = None
    audio_bytes = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                delta_audio = choice["delta"].get("audio") or {}
                if choice["delta"].get("content") or delta_audio.get("transcript"):
                    first_text = first_text or time.perf_counter() - start
                data = delta_audio.get("data")
                if data:
                    first_audio = first_audio or time.perf_counter() - start
                    audio_bytes += len(base64.b64decode(data))
    return {
        "first_audio": first_audio,
        "first_text": first_text,
        "total": time.perf_counter() - start,
        "audio_seconds": audio_bytes / 2 / SAMPLE_RATE,
    }


def run_level(url: str, body: bytes, clients: int, rounds: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client():
        for _ in range(rounds):
            barrier.wait()  # every client sends at the same moment
            outcome = _one_request(url, body)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    first = [r["first_audio"] for r in results if r["first_audio"] is not None]
    first_text = [r["first_text"] for r in results if r["first_text"] is not None]
    return {
        "first_text_median": statistics.median(first_text),
        "first_text_p95": _percentile(first_text, 0.95),
        "clients": clients,
        "requests": len(results),
        "first_audio_median": statistics.median(first) if first else float("nan"),
        "first_audio_p95": _percentile(first, 0.95) if first else float("nan"),
        "audio_per_second": sum(r["audio_seconds"] for r in results) / wall,
        "replies_per_second": len(results) / wall,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=40, help="LLM steps per reply (5 speech codes each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()

    from fun_audio_chat.processing import example_audio_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fun_audio_chat.cli",
            "serve",
            "--port",
            str(port),
            "--threads",
            str(args.threads),
            "--max-batch-size",
            str(max(args.clients)),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start within 180 s") from None
                time.sleep(0.3)
        audio = base64.b64encode(Path(example_audio_path()).read_bytes()).decode("ascii")
        request = {
            "model": health["model"],
            "stream": True,
            "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"},
            "temperature": 0,
            "max_tokens": args.max_tokens,
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}
            ],
        }
        spoken = json.dumps(request).encode()
        text_only = json.dumps({**request, "modalities": ["text"], "audio": None}).encode()
        _one_request(url, spoken)  # warm-up
        levels = [run_level(url, spoken, clients, args.rounds) for clients in args.clients]
        text_levels = [run_level(url, text_only, clients, args.rounds) for clients in args.clients]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    print(
        f"fun-audio-chat serve, tiny model + tiny detokenizer, CPU, {args.threads} torch thread(s); {args.rounds} "
        f"rounds of simultaneous streamed replies to the bundled question, {args.max_tokens} LLM steps each"
    )
    print("\nspoken replies (text + 24 kHz audio)")
    base = levels[0]
    print(
        f"{'clients':>7} {'requests':>8} {'1st audio median':>17} {'p95':>8} {'audio s / s':>11} "
        f"{'replies / s':>11} {'throughput x':>12} {'1st audio x':>11}"
    )
    for level in levels:
        print(
            f"{level['clients']:>7} {level['requests']:>8} {level['first_audio_median']:>15.3f} s "
            f"{level['first_audio_p95']:>6.3f} s {level['audio_per_second']:>11.2f} "
            f"{level['replies_per_second']:>11.2f} {level['audio_per_second'] / base['audio_per_second']:>12.2f} "
            f"{level['first_audio_median'] / base['first_audio_median']:>11.2f}"
        )
    print("\ntext-only replies")
    base = text_levels[0]
    print(
        f"{'clients':>7} {'requests':>8} {'1st text median':>16} {'p95':>8} {'tokens / s':>10} "
        f"{'replies / s':>11} {'throughput x':>12} {'1st text x':>10}"
    )
    for level in text_levels:
        tokens = level["replies_per_second"] * args.max_tokens
        print(
            f"{level['clients']:>7} {level['requests']:>8} {level['first_text_median']:>14.3f} s "
            f"{level['first_text_p95']:>6.3f} s {tokens:>10.1f} {level['replies_per_second']:>11.2f} "
            f"{level['replies_per_second'] / base['replies_per_second']:>12.2f} "
            f"{level['first_text_median'] / base['first_text_median']:>10.2f}"
        )
    print("throughput x / 1st ... x: ratios to the first row of each table (batching gain / latency cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
