"""Cost of cloning a voice from a clip, stage by stage (what ``fun-audio-chat clone-voice`` and ``serve --voice
NAME=CLIP`` spend once per voice; replies in that voice do not repeat it).

    python benchmarks/bench_voice_cloning.py                      # tiny cloner (random tiny S3 + tiny encoder)
    python benchmarks/bench_voice_cloning.py --real-size-tokenizer  # the real-size S3 v3 (random weights)
    python benchmarks/bench_voice_cloning.py --campplus campplus.onnx --real-size-tokenizer

Stages: decoding and resampling the clip to 16 and 24 kHz, the S3 speech codes (16 kHz), the CosyVoice 3 prompt mel
(24 kHz), the Kaldi fbank and the speaker encoder (CAM++ when ``--campplus`` is given, else the tiny random ONNX one).
Each number is the median of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import soundfile as sf
import torch


def speech_like_clip(seconds: float, sample_rate: int = 44100) -> bytes:
    """A 16-bit WAV of a harmonic tone with four syllables a second, as a user's upload would arrive."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * wave).astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first-call imports and allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--real-size-tokenizer", action="store_true", help="the real-size S3 v3 (random weights)")
    parser.add_argument("--campplus", help="a real campplus.onnx (default: the tiny random speaker encoder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fun_audio_chat.processing.speech_tokenizer import S3SpeechTokenizer
    from fun_audio_chat.tiny import tiny_s3_speech_tokenizer
    from fun_audio_chat.voices import OnnxSpeakerEncoder, VoiceCloner, prompt_mel, speaker_fbank
    from fun_audio_chat.voices.speaker_encoder import tiny_speaker_encoder_model

    tokenizer = S3SpeechTokenizer.random() if args.real_size_tokenizer else tiny_s3_speech_tokenizer()
    encoder = OnnxSpeakerEncoder(args.campplus or tiny_speaker_encoder_model(), threads=1)
    cloner = VoiceCloner(tokenizer, encoder, num_codes=6561)
    clip = speech_like_clip(args.seconds)
    at_16k, at_24k = cloner.load_clip(clip)
    fbank = speaker_fbank(at_16k)
    stages = {
        "decode + resample to 16 and 24 kHz": lambda: cloner.load_clip(clip),
        "S3 speech codes (16 kHz)": lambda: tokenizer(at_16k, sampling_rate=16000),
        "prompt mel (24 kHz)": lambda: prompt_mel(at_24k),
        "Kaldi fbank (16 kHz)": lambda: speaker_fbank(at_16k),
        "speaker encoder (on the fbank)": lambda: encoder.embed_fbank(fbank),
        "whole clone": lambda: cloner.clone(clip),
    }
    tokenizer_name = "real-size S3 v3 (random weights)" if args.real_size_tokenizer else "tiny S3 v3"
    encoder_name = args.campplus or "tiny random ONNX encoder"
    print(f"clone a {args.seconds:g} s clip: {tokenizer_name}, {encoder_name}, {args.threads} torch threads")
    total = None
    for name, function in stages.items():
        seconds = median_seconds(function, args.repeats)
        total = seconds if name == "whole clone" else total
        print(f"  {name:<36} {seconds * 1000:8.1f} ms")
    print(f"clone time {total:.2f} s for {args.seconds:g} s of audio (RTF {total / args.seconds:.3f})")


if __name__ == "__main__":
    main()
