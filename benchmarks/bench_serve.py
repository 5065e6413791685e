"""``fun-audio-chat serve`` under load, through the real ``openai`` client: first audio and spoken throughput with 1,
4 and 8 clients whose requests arrive staggered (one every ``--interval`` seconds, as people talk) or all at once.

Starts ``fun-audio-chat serve`` (the tiny built-in model and the tiny random detokenizer, CPU; uvicorn on
127.0.0.1) as a subprocess. At each client count and arrival pattern it runs ``--rounds`` rounds; in a round every
client sends the bundled spoken question once as a streamed chat completion with a spoken reply
(``modalities=["text", "audio"]``, pcm16, greedy, ``--max-tokens`` LLM steps), client i at ``i * interval`` seconds
(staggered) or at 0 (simultaneous). Measured per request from its own send: time to the first audio chunk; per
level: spoken throughput = reply-audio seconds received / wall seconds of the rounds. The ratios to one client show
what concurrency costs (first-audio p50 ×) and buys (throughput ×). Issue 24's goal on the tiny model, 2 cores:
8 staggered clients at ≤ 2× one client's first-audio p50 and ≥ 4× its spoken throughput.

Each level also prints where a reply's first audio went on the server (p50 of ``/metrics``' per-turn times from
the request's arrival): waiting for room in the batch, end of the prefill, first real speech codes (after the
speech-BOS delay steps), first audio chunk.

The Realtime API (``/v1/realtime``, the real SDK's ``client.realtime.connect``) is measured with
``--realtime-clients`` concurrent sessions: each streams the question as 24 kHz PCM16 in 100 ms chunks at real-time
pace, then silence, with server VAD (silero) deciding the end of the turn; printed: the client-side time from the
last chunk of the question to the first reply audio, and the server's split of the end of the user's speech → first
audio (VAD wait, submit, queue + prefill, first speech group, first audio chunk).

Two bounds explain the throughput ratio, and are printed with it:
* the **arrival span**: N requests sent ``interval`` apart take at least ``(N - 1) * interval + T1`` seconds (T1:
  one client's reply time), so staggered throughput x <= N * T1 / ((N - 1) * interval + T1) however fast the
  server is;
* the **stage capacities**, measured in-process on the same tiny model and detokenizer with the server's thread
  count: reply-audio seconds per second of the LLM decoder (``ContinuousBatchDecoder``) and of one speech worker
  (``push_streams`` fed 5 codes per LLM step, the server's schedule), alone and with 8 replies at once. The
  server's throughput x cannot exceed the slower stage's scaling (times the workers that fit on idle cores).

Usage: python benchmarks/bench_serve.py [--clients 1 4 8] [--rounds 3] [--max-tokens 40] [--threads 1]
           [--arrivals staggered simultaneous] [--interval 0.25] [--realtime-clients 1 4] [--chunked-synthesis]
           [--synthesis-workers 1] [--synthesis-hop-growth 1] [--no-capacity]
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


def _audio_delta(delta) -> dict:
    """The ``audio`` member of a streamed delta (an extra field of the SDK's ``ChoiceDelta``), as a dict."""
    audio = getattr(delta, "audio", None)
    if audio is None and getattr(delta, "model_extra", None):
        audio = delta.model_extra.get("audio")
    if audio is None:
        return {}
    return audio if isinstance(audio, dict) else audio.model_dump()


def _one_request(client, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed spoken reply: seconds to the first text and first audio chunk, to the end; audio duration."""
    start = time.perf_counter()
    first_audio = first_text = None
    audio_bytes = 0
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": "default", "format": "pcm16"},
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            audio = _audio_delta(choice.delta)
            if choice.delta.content or audio.get("transcript"):
                first_text = first_text or time.perf_counter() - start
            if audio.get("data"):
                first_audio = first_audio or time.perf_counter() - start
                audio_bytes += len(base64.b64decode(audio["data"]))
    return {
        "first_audio": first_audio,
        "first_text": first_text,
        "total": time.perf_counter() - start,
        "audio_seconds": audio_bytes / 2 / SAMPLE_RATE,
    }


def run_level(client, model: str, messages: list, args, clients: int, interval: float) -> dict:
    """``args.rounds`` rounds of ``clients`` requests sent ``interval`` seconds apart (0 = all at once)."""
    results: list[dict] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    wall = 0.0
    round_walls = []
    for _ in range(args.rounds):
        round_start = time.perf_counter()

        def send(index: int, round_start: float = round_start):
            time.sleep(max(0.0, round_start + index * interval - time.perf_counter()))
            try:
                outcome = _one_request(client, model, messages, args.max_tokens)
            except BaseException as error:  # noqa: BLE001 - reported after the round
                with lock:
                    failures.append(error)
                return
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=send, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        round_walls.append(time.perf_counter() - round_start)
        wall += round_walls[-1]
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) failed; first: {failures[0]!r}")
    first_audio = [r["first_audio"] for r in results if r["first_audio"] is not None]
    if not first_audio:
        raise RuntimeError("no reply carried audio: is the server's detokenizer loaded?")
    return {
        "clients": clients,
        "requests": len(results),
        "first_audio_p50": statistics.median(first_audio),
        "first_text_p50": statistics.median([r["first_text"] for r in results if r["first_text"] is not None]),
        "audio_per_second": sum(r["audio_seconds"] for r in results) / wall,
        "audio_seconds": sum(r["audio_seconds"] for r in results) / len(results),
        "round_seconds": statistics.median(round_walls),
    }


def stage_capacity(args, replies: int) -> dict:
    """Reply-audio seconds per second of the LLM decoder and of one speech worker, in this process, for
    ``replies`` replies of ``args.max_tokens`` steps decoded (rendered) together."""
    import torch

    from fun_audio_chat.modeling import ContinuousBatchDecoder
    from fun_audio_chat.tiny import TINY_SPEECH_CODES, tiny_detokenizer, tiny_model_and_processor

    torch.set_num_threads(args.threads)
    model, processor = tiny_model_and_processor(0)
    question = [{"role": "user", "content": [{"type": "text", "text": "What is the weather like today?"}]}]
    inputs = processor.apply_chat_template(
        [question], add_generation_prompt=True, speech_output=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    decoder = ContinuousBatchDecoder(model)
    with torch.inference_mode():
        for _ in range(replies):
            decoder.add(inputs, max_new_tokens=args.max_tokens, force_audio_bos=True, do_sample=False)
        start, steps = time.perf_counter(), 0
        while decoder.has_rows:
            steps += len(decoder.step())
    llm = steps * 0.2 / (time.perf_counter() - start)  # each row-step brings 5 codes = 0.2 s of speech
    detokenizer = tiny_detokenizer(0)
    generator = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, TINY_SPEECH_CODES, (5 * args.max_tokens,), generator=generator).tolist()] * replies
    sessions = [
        detokenizer.streaming_session(chunked=args.chunked_synthesis, hop_growth=args.synthesis_hop_growth)
        for _ in range(replies)
    ]
    samples, start = 0, time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(codes[0]), 5):
            last = first + 5 >= len(codes[0])
            for session, row in zip(sessions, codes):
                session.add_codes(row[first : first + 5])
            while due := [(s, (), last) for s in sessions if not s.finished and (last or s.has_due_calls)]:
                samples += sum(piece.numel() for piece in detokenizer.push_streams(due, max_rounds=1))
    speech = samples / detokenizer.sample_rate / (time.perf_counter() - start)
    return {"llm": llm, "speech": speech}


SPLIT_FIELDS = ("queue_seconds", "prefill_seconds", "first_speech_seconds", "first_audio_seconds")
REALTIME_FIELDS = (
    "vad_wait",
    "turn_end_to_submit",
    "queue_prefill",
    "first_speech_group",
    "first_audio_chunk",
    "turn_end_to_first_audio",
)


def _metrics(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics?format=json", timeout=10) as response:
        return json.loads(response.read())


def _p50(turns: list[dict], field: str) -> float | None:
    values = [turn[field] for turn in turns if turn.get(field) is not None]
    return statistics.median(values) if values else None


def _realtime_session(url: str, model: str, pcm24: bytes, max_tokens: int) -> dict:
    """One spoken turn over /v1/realtime with server VAD: the question streamed in 100 ms chunks at real-time pace,
    then silence until the reply is done. Returns seconds from the last chunk of the question to the first audio."""
    import asyncio

    from openai import AsyncOpenAI

    chunk = SAMPLE_RATE // 10 * 2  # 100 ms of PCM16
    silence = bytes(chunk)

    async def run() -> dict:
        client = AsyncOpenAI(
            api_key="not-needed", base_url=f"{url}/v1", websocket_base_url=url.replace("http", "ws", 1) + "/v1"
        )
        async with client.realtime.connect(model=model) as conn:
            await conn.send(
                {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": max_tokens}}
            )
            question_end = first_audio = None
            done = asyncio.Event()

            async def receive():
                nonlocal first_audio
                async for event in conn:
                    if event.type == "response.output_audio.delta" and first_audio is None:
                        first_audio = time.perf_counter()
                    if event.type == "response.done":
                        done.set()
                        return
                    if event.type == "error":
                        raise RuntimeError(f"realtime error: {event.error.message}")

            receiver = asyncio.create_task(receive())
            start = time.perf_counter()
            pieces = [pcm24[i : i + chunk] for i in range(0, len(pcm24), chunk)]
            for index, piece in enumerate(pieces):
                await asyncio.sleep(max(0.0, start + index * 0.1 - time.perf_counter()))
                await conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()})
            question_end = time.perf_counter()
            index = len(pieces)
            while not done.is_set() and time.perf_counter() - question_end < 60:
                await asyncio.sleep(max(0.0, start + index * 0.1 - time.perf_counter()))
                await conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(silence).decode()})
                index += 1
            await asyncio.wait_for(receiver, 60)
            return {"question_end_to_first_audio": None if first_audio is None else first_audio - question_end}

    return asyncio.run(run())


def run_realtime(url: str, model: str, clients: int, max_tokens: int) -> dict:
    import numpy as np
    import soundfile as sf
    import soxr

    from fun_audio_chat.processing import example_audio_path

    wave, rate = sf.read(example_audio_path(), dtype="float32")
    pcm24 = (np.clip(soxr.resample(wave, rate, SAMPLE_RATE), -1, 1) * 32767).astype("<i2").tobytes()
    before = len(_metrics(url)["realtime"]["recent_turns"])
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda: results.append(_realtime_session(url, model, pcm24, max_tokens)))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    turns = _metrics(url)["realtime"]["recent_turns"][max(0, before - 20) :][-clients:]
    client_side = [r["question_end_to_first_audio"] for r in results if r["question_end_to_first_audio"] is not None]
    return {
        "clients": clients,
        "client_p50": statistics.median(client_side) if client_side else None,
        **{field: _p50(turns, field) for field in REALTIME_FIELDS},
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _start_server(args) -> tuple[subprocess.Popen, str, dict]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    command = [sys.executable, "-m", "fun_audio_chat.cli", "serve", "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-batch-size", str(max(args.clients)), "--log-level", "warning"]
    if args.chunked_synthesis:
        command.append("--chunked-synthesis")
    command += ["--synthesis-workers", str(args.synthesis_workers)]
    command += ["--synthesis-hop-growth", str(args.synthesis_hop_growth)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return server, url, json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the server did not start within 180 s") from None
            time.sleep(0.3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=40, help="LLM steps per reply (5 speech codes each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--arrivals", nargs="+", choices=["staggered", "simultaneous"], default=None)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between staggered requests")
    parser.add_argument(
        "--chunked-synthesis", action="store_true", help="serve with --chunked-synthesis (the cached chunk-causal flow)"
    )
    parser.add_argument(
        "--realtime-clients", type=int, nargs="*", default=[1, 4], help="concurrent Realtime sessions (none: skip)"
    )
    parser.add_argument("--synthesis-workers", type=int, default=1, help="serve with --synthesis-workers N")
    parser.add_argument("--synthesis-hop-growth", type=int, default=1, help="serve with --synthesis-hop-growth N")
    parser.add_argument(
        "--no-capacity", action="store_true", help="skip the in-process stage capacities (LLM, one speech worker)"
    )
    args = parser.parse_args()
    arrivals = args.arrivals or ["staggered", "simultaneous"]

    from openai import OpenAI

    from fun_audio_chat.processing import example_audio_path

    server, url, health = _start_server(args)
    try:
        # One HTTP connection per concurrent request, as separate clients would have.
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=600)
        audio = base64.b64encode(Path(example_audio_path()).read_bytes()).decode("ascii")
        messages = [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}
        ]
        model = health["model"]
        _one_request(client, model, messages, args.max_tokens)  # warm-up
        tables = {}
        for pattern in arrivals:
            levels = []
            for clients in args.clients:
                level = run_level(
                    client, model, messages, args, clients, args.interval if pattern == "staggered" else 0.0
                )
                turns = [t for t in _metrics(url)["recent_turns"] if t.get("speech")][-level["requests"] :]
                level.update({field: _p50(turns, field) for field in SPLIT_FIELDS})
                levels.append(level)
            tables[pattern] = levels
        realtime = [run_realtime(url, model, clients, args.max_tokens) for clients in args.realtime_clients]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    capacity = None if args.no_capacity else {n: stage_capacity(args, n) for n in (1, max(args.clients))}
    print(
        f"fun-audio-chat serve via the openai client, tiny model + tiny detokenizer, CPU, {args.threads} torch "
        f"thread(s), {args.synthesis_workers} synthesis worker(s), hop growth {args.synthesis_hop_growth}, "
        f"{'chunked' if args.chunked_synthesis else 'official-schedule'} synthesis; {args.rounds} round(s) per "
        f"level of streamed spoken replies to the bundled question, {args.max_tokens} LLM steps each"
    )
    for pattern, levels in tables.items():
        spacing = f"one request every {args.interval:g} s" if pattern == "staggered" else "all at once"
        print(f"\n{pattern} arrivals ({spacing})")
        print(
            f"{'clients':>7} {'requests':>8} {'1st audio p50':>13} {'1st text p50':>12} {'reply audio':>11} "
            f"{'audio s / s':>11} {'1st audio x':>11} {'throughput x':>12}"
        )
        base = levels[0]
        for level in levels:
            if pattern == "staggered" and level is not base:
                reply = base["round_seconds"]
                bound = level["clients"] * reply / ((level["clients"] - 1) * args.interval + reply)
                level["span_bound"] = bound
            print(
                f"{level['clients']:>7} {level['requests']:>8} {level['first_audio_p50']:>11.3f} s "
                f"{level['first_text_p50']:>10.3f} s {level['audio_seconds']:>9.2f} s {level['audio_per_second']:>11.2f} "
                f"{level['first_audio_p50'] / base['first_audio_p50']:>11.2f} "
                f"{level['audio_per_second'] / base['audio_per_second']:>12.2f}"
            )
        print(
            f"  server-side p50 from arrival (s): {'clients':>7} {'queue':>7} {'prefill':>8} {'1st speech':>10} {'1st audio':>9}"
        )
        for level in levels:
            print(
                f"  {'':>32} {level['clients']:>7} {_seconds(level['queue_seconds']):>7} "
                f"{_seconds(level['prefill_seconds']):>8} {_seconds(level['first_speech_seconds']):>10} "
                f"{_seconds(level['first_audio_seconds']):>9}"
            )
    print(
        f"1st audio x / throughput x: ratios to {args.clients[0]} client(s) with the same arrivals "
        "(goal at 8 staggered clients: 1st audio x <= 2, throughput x >= 4)"
    )
    for level in tables.get("staggered", []):
        if "span_bound" in level:
            print(
                f"arrival-span bound at {level['clients']} staggered clients: throughput x <= {level['span_bound']:.2f} "
                f"(one client's reply takes {tables['staggered'][0]['round_seconds']:.2f} s)"
            )
    if capacity:
        most = max(args.clients)
        print(f"\nstage capacity in-process (reply-audio s / s), 1 vs {most} replies at once, {args.threads} thread(s)")
        for stage, name in (("llm", "LLM decoder"), ("speech", "one speech worker")):
            alone, together = capacity[1][stage], capacity[most][stage]
            print(f"  {name:<18} {alone:>8.2f} {together:>8.2f}   x {together / alone:.2f}")
    if realtime:
        print("\nRealtime API (/v1/realtime, server VAD, question streamed at real-time pace), p50 seconds")
        header = " ".join(f"{name:>23}" for name in ("question end->1st audio", *REALTIME_FIELDS))
        print(f"{'sessions':>8} {header}")
        for level in realtime:
            values = [level["client_p50"]] + [level[field] for field in REALTIME_FIELDS]
            print(f"{level['clients']:>8} " + " ".join(f"{_seconds(v):>23}" for v in values))
        print(
            "vad_wait: end of speech -> speech_stopped; turn_end_to_submit: -> engine; queue_prefill: -> prefill done; "
            "first_speech_group: -> first real codes; first_audio_chunk: -> first audio rendered"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
