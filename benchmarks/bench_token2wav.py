"""CosyVoice 3 token-to-waveform: offline real-time factor, streaming cost relative to offline, time to the
first audio chunk, and offline batching — real-size config (flow 332 M, HiFT 20.8 M parameters), random weights,
fp32, CPU.

Streaming patterns (each renders the same codes, fed one code at a time as a model would emit them):
* ``official``: the Fun-Audio-Chat web-demo schedule as the official code runs it — a call every 15 codes once
  15 + 3 are available, each call redoing the flow over every code so far and the vocoder over the whole mel
  history (``streaming_session(use_cache=False)``);
* ``windowed``: the same schedule and flow, the vocoder re-rendering only a window around the new frames;
* ``cached``: ``streaming_session(chunked=True)``: a call every 25 codes (one attention chunk) with chunk-causal
  attention; the flow keeps its keys/values of earlier chunks and the vocoder works on a window;
* ``cached15``: the same with a call every 15 codes (a partial chunk is recomputed by the next call).
The first chunk of ``official``/``windowed``/``cached15`` comes after 18 codes, of ``cached`` after 28.

Many replies at once (``--streams N``, what a server synthesising N replies does): N ``windowed`` sessions fed 5
codes per tick (one LLM step each), advanced one after the other with ``session.push`` versus together with one
``det.push_streams`` call per tick (one batched flow call, batched vocoder windows); then the same with N
``cached`` sessions (their cached chunk-causal flow calls batched too).

A voice with a prompt (``--voice-only``, or ``--prompt-seconds S`` after the other parts): the same reply spoken in a
``CosyVoice3Voice`` with S seconds of prompt codes + prompt mel vs the default speaker (embedding only), offline,
``windowed`` and ``cached``. The flow runs over prompt + reply, so a full-attention call pays for the prompt's
frames every time; a ``cached`` session starts from the voice's cached prompt chunks, computed once per voice (the
first session of a voice pays for them, shown on its own line) and then shared by every reply in that voice.

Prints seconds and the ratios side by side. Usage:
    python benchmarks/bench_token2wav.py [--codes 50] [--batch 4] [--streams 8] [--threads 2] [--patterns official,cached]
        [--prompt-seconds 10] [--voice-only]

On two idle cores the default run takes a few minutes (the official pattern dominates); on a shared machine the
ratios hold but the seconds grow with the load.
"""

from __future__ import annotations

import argparse
import time

import torch

from fun_audio_chat.token2wav.configuration_cosyvoice3 import CosyVoice3Config
from fun_audio_chat.token2wav.modeling_cosyvoice3 import random_detokenizer
from fun_audio_chat.token2wav.voice import CosyVoice3Voice


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def stream(model, codes, **session_kwargs):
    """Feed codes one by one; returns (total seconds, seconds until the first non-empty chunk, codes fed then)."""
    session = model.streaming_session(**session_kwargs)
    first = None
    start = time.perf_counter()
    samples = 0
    for index, code in enumerate(codes):
        chunk = session.push([code])
        samples += chunk.numel()
        if first is None and chunk.numel():
            first = (time.perf_counter() - start, index + 1)
    samples += session.finish().numel()
    total = time.perf_counter() - start
    assert samples == len(codes) * model.samples_per_token, samples
    return total, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=50, help="speech codes to render (25 per second of audio)")
    parser.add_argument("--batch", type=int, default=4, help="rows for the batched offline run (0 to skip)")
    parser.add_argument(
        "--streams", type=int, default=8, help="concurrent streams for the push_streams run (0 to skip)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--patterns",
        default="official,cached",
        help="streaming patterns to time, from official, windowed, cached, cached15",
    )
    parser.add_argument(
        "--prompt-seconds",
        type=float,
        default=None,
        help="prompt length of the voice comparison (default: 10 with --voice-only, otherwise not run)",
    )
    parser.add_argument("--voice-only", action="store_true", help="run only the voice (prompt) comparison")
    args = parser.parse_args()
    if args.voice_only and args.prompt_seconds is None:
        args.prompt_seconds = 10.0
    torch.set_num_threads(args.threads)

    build, model = timed(lambda: random_detokenizer(CosyVoice3Config(), seed=0))
    flow_params = sum(p.numel() for p in model.flow.parameters())
    hift_params = sum(p.numel() for p in model.hift.parameters())
    print(
        f"real-size detokenizer: flow {flow_params:,} + HiFT {hift_params:,} parameters, built in {build:.1f} s, "
        f"{args.threads} thread(s), fp32"
    )
    model.ensure_noise()
    codes = torch.randint(0, 6561, (args.codes,), generator=torch.Generator().manual_seed(0)).tolist()
    audio_seconds = args.codes / 25
    model(codes[:4])  # warm-up
    if args.voice_only:
        voice_report(model, codes, args.prompt_seconds)
        return

    offline, _ = timed(lambda: model(codes))
    print(f"\n{args.codes} codes = {audio_seconds:.2f} s of audio")
    print(f"{'pattern':<34}{'seconds':>9}{'x offline':>11}{'RTF':>8}{'first chunk s':>15}{'after codes':>13}")
    print(f"{'offline (one call)':<34}{offline:>9.2f}{1.0:>11.2f}{offline / audio_seconds:>8.2f}{'':>15}{'':>13}")
    known = {
        "official": ("official web-demo (recompute all)", {"use_cache": False}),
        "windowed": ("web-demo, windowed vocoder", {"use_cache": True}),
        "cached": ("cached chunked (hop 25)", {"chunked": True}),
        "cached15": ("cached chunked, hop 15", {"chunked": True, "hop_tokens": 15}),
    }
    chosen = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in known]
    if unknown:
        parser.error(f"--patterns: unknown {unknown}; choose from {sorted(known)}")
    for name, kwargs in (known[p] for p in chosen):
        total, first = stream(model, codes, **kwargs)
        first_s, first_at = first if first else (float("nan"), 0)
        print(
            f"{name:<34}{total:>9.2f}{total / offline:>11.2f}{total / audio_seconds:>8.2f}{first_s:>15.2f}"
            f"{first_at:>13d}"
        )
    if args.batch:
        rows = [
            torch.randint(0, 6561, (args.codes,), generator=torch.Generator().manual_seed(s)).tolist()
            for s in range(args.batch)
        ]
        batched, _ = timed(lambda: model(rows))
        per_row = batched / args.batch
        print(
            f"{f'offline batch of {args.batch}, per row':<34}{per_row:>9.2f}{per_row / offline:>11.2f}"
            f"{per_row / audio_seconds:>8.2f}{'':>15}{'':>13}"
        )
    if args.streams:
        streams_report(model, args.codes, args.streams)
    if args.prompt_seconds:
        voice_report(model, codes, args.prompt_seconds)
    print("\nx offline = cost relative to one offline call on the same codes; RTF = seconds per second of audio.")


def streams_report(model, num_codes: int, num_streams: int) -> None:
    """N sessions fed 5 codes per tick: one by one (``push``) vs together (``push_streams``), same audio; first
    ``windowed`` sessions (full attention), then ``cached`` ones (``chunked=True``)."""
    replies = [
        torch.randint(0, 6561, (num_codes,), generator=torch.Generator().manual_seed(100 + s)).tolist()
        for s in range(num_streams)
    ]
    ticks = [[reply[i : i + 5] for i in range(0, num_codes, 5)] for reply in replies]

    def one_by_one(**session_kwargs):
        sessions = [model.streaming_session(**session_kwargs) for _ in replies]
        audio = [[] for _ in replies]
        for tick in range(len(ticks[0])):
            for row, session in enumerate(sessions):
                audio[row].append(session.push(ticks[row][tick]))
        for row, session in enumerate(sessions):
            audio[row].append(session.finish())
        return [torch.cat(parts) for parts in audio]

    def together(**session_kwargs):
        sessions = [model.streaming_session(**session_kwargs) for _ in replies]
        audio = [[] for _ in replies]
        last = len(ticks[0]) - 1
        for tick in range(len(ticks[0])):
            entries = [(session, ticks[row][tick], tick == last) for row, session in enumerate(sessions)]
            for row, piece in enumerate(model.push_streams(entries)):
                audio[row].append(piece)
        return [torch.cat(parts) for parts in audio]

    alone_s, alone = timed(one_by_one)
    batched_s, batched = timed(together)
    worst = max((a - b).abs().max().item() for a, b in zip(alone, batched))
    audio_seconds = num_streams * num_codes / 25
    print(
        f"\n{num_streams} streams x {num_codes} codes, 5 codes per tick ({audio_seconds:.1f} s of audio in all): "
        f"one by one {alone_s:.2f} s, push_streams {batched_s:.2f} s -> {alone_s / batched_s:.2f}x "
        f"(largest sample difference {worst:.1e})"
    )
    alone_s, alone = timed(lambda: one_by_one(chunked=True))
    batched_s, batched = timed(lambda: together(chunked=True))
    worst = max((a - b).abs().max().item() for a, b in zip(alone, batched))
    print(
        f"the same {num_streams} streams cached chunked (chunked=True): one by one {alone_s:.2f} s, "
        f"push_streams {batched_s:.2f} s -> {alone_s / batched_s:.2f}x (largest sample difference {worst:.1e})"
    )


def voice_report(model, codes: list[int], prompt_seconds: float) -> None:
    """The same reply with a voice carrying ``prompt_seconds`` of prompt vs the default speaker: offline,
    ``windowed`` and ``cached`` streaming; for ``cached`` the voice's one-time prompt encoding on its own line."""
    prompt_codes = round(prompt_seconds * 25)
    generator = torch.Generator().manual_seed(7)
    voice = CosyVoice3Voice(
        "bench",
        speaker_embedding=torch.randn(192, generator=generator),
        prompt_codes=torch.randint(0, model.config.flow.vocab_size, (prompt_codes,), generator=generator),
        prompt_mel=torch.randn(2 * prompt_codes, 80, generator=generator) * 2 - 5,
    )
    reply_seconds = len(codes) / 25
    print(
        f"\nvoice with a {prompt_seconds:.1f} s prompt ({prompt_codes} codes) vs the default speaker, reply "
        f"{len(codes)} codes = {reply_seconds:.2f} s of audio"
    )
    print(f"{'pattern':<34}{'no prompt s':>12}{'prompt s':>10}{'ratio':>8}{'first chunk s (no/with)':>26}")
    plain, _ = timed(lambda: model(codes))
    prompted, _ = timed(lambda: model(codes, voice=voice))
    print(f"{'offline (one call)':<34}{plain:>12.2f}{prompted:>10.2f}{prompted / plain:>8.2f}")
    for name, kwargs in (("web-demo, windowed vocoder", {}), ("cached chunked (hop 25)", {"chunked": True})):
        if kwargs.get("chunked"):
            # the voice's prompt chunks are encoded on its first chunked session, once
            encode, _ = timed(lambda: model.streaming_session(voice=voice, chunked=True))
            print(f"{'  voice prompt cache (once/voice)':<34}{'':>12}{encode:>10.2f}")
        total_plain, first_plain = stream(model, codes, **kwargs)
        total_voice, first_voice = stream(model, codes, voice=voice, **kwargs)
        # a reply shorter than the first hop has no chunk before finish(): "-"
        firsts = " / ".join("-" if first is None else f"{first[0]:.2f}" for first in (first_plain, first_voice))
        print(f"{name:<34}{total_plain:>12.2f}{total_voice:>10.2f}{total_voice / total_plain:>8.2f}{firsts:>26}")
    print(
        "ratio = reply cost with the prompt / without. Full-attention calls (offline, web-demo) run the flow over "
        "prompt + reply every call; the cached chunked session reuses the voice's prompt chunks."
    )


if __name__ == "__main__":
    main()
