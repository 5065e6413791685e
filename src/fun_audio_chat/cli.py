"""``fun-audio-chat``: the command-line entry point.

Commands (``fun-audio-chat COMMAND --help`` for each):

* ``demo`` — speech-to-speech on a tiny built-in model and the bundled speech clip, streamed as it is generated
  (text pieces and 25 Hz speech-code groups), with timings. No downloads.
* ``chat`` — answer one audio file with a model directory or Hub id (``tiny`` for the built-in model); writes the
  reply text, the speech codes (JSON) and, when a detokenizer is available, a wav.
* ``tokenize-speech`` — batch S3Tokenizer over a folder of audio files or a dataset → JSON lines of codes.
* ``merge`` — Core-Cocktail merge ``alpha * tuned + (1 - alpha) * base`` of checkpoints on disk.
* ``convert-detokenizer`` — an official CosyVoice 3 folder (or Hub id) → our safetensors detokenizer folder (and the
  released speakers, when a ``spk2info.pt`` comes with it, as ``voices/<name>.safetensors``).
* ``clone-voice`` — a 3-30 s clip of one speaker → a voice file for ``chat --voice`` / ``serve --voice``.
* ``serve`` — a voice chat page and an OpenAI-compatible audio API (``/v1/chat/completions``) over one model.

Errors the user can fix (a missing file, a directory that is not a checkpoint, a model that cannot be fetched)
print one ``fun-audio-chat <command>: error: ...`` line on stderr and exit with status 2.
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.

This module parses arguments, checks the user's input and prints: a spoken turn is
:class:`~fun_audio_chat.voice_chat.VoiceChat`'s (``demo`` and ``chat`` print its events), the rest is the library's
(loading, merging, tokenizing, converting, cloning, serving).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .speech_codes import SPEECH_FRAME_RATE

EXIT_USAGE = 2
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aiff", ".aif")


class CLIError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``PROG: error: ...``) with exit status 2, like every other CLI error."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _at_least(1)


# ------------------------------------------------------------------------------------------------ helpers
def _say(*parts, file=None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)


def _printable(text: str) -> str:
    """Text safe to write to a terminal: control characters (except newline and tab) become U+FFFD."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" else "\ufffd" for ch in text)


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine (use --device cpu).")
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _load_model_or_fail(spec: str, device: str, dtype):
    from .loading import ModelLoadError, load_model_and_processor

    try:
        return load_model_and_processor(spec, device=device, dtype=dtype)
    except ModelLoadError as err:
        raise CLIError(f"--model {err.source}: {err.reason}") from err


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _load_audio_or_fail(processor, path: str):
    from .processing import AudioInputError

    try:
        return processor.load_audio(path, name=path)
    except AudioInputError as err:
        raise CLIError(str(err)) from err


# ------------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    startup = _process_age()  # python start-up + importing torch/transformers/fun_audio_chat
    from . import VoiceChat  # imports torch, transformers and the model code before the timed steps
    from .processing import example_audio_path

    _set_threads(args.threads)
    model, processor, detokenizer, build_times = _build_tiny_pipeline(args.seed)
    audio_path = args.audio or example_audio_path()
    waveform = _load_audio_or_fail(processor, audio_path)
    _print_demo_header(model, audio_path, waveform, bundled=args.audio is None)
    chat = VoiceChat(model, processor, detokenizer, max_new_tokens=args.max_new_tokens, do_sample=False)
    result, groups = _stream_demo_reply(chat, waveform, args.seed)
    _print_demo_reply(result, groups)
    if args.out:
        _save_demo_reply(Path(args.out), result, audio_path)
    _print_demo_timings(startup, build_times, result.metrics)
    return 0


def _build_tiny_pipeline(seed: int):
    """The tiny built-in model, processor and detokenizer, and how long the model and the detokenizer took."""
    from .tiny import tiny_detokenizer, tiny_model_and_processor

    t_import = time.perf_counter()
    model, processor = tiny_model_and_processor(seed)
    t_model = time.perf_counter()
    detokenizer = tiny_detokenizer(seed)
    t_detokenizer = time.perf_counter()
    return model, processor, detokenizer, (t_model - t_import, t_detokenizer - t_model)


def _print_demo_header(model, audio_path, waveform, bundled: bool) -> None:
    from .processing import EXAMPLE_AUDIO_TEXT, TARGET_SAMPLING_RATE

    n_params = sum(p.numel() for p in model.parameters())
    text_cfg = model.config.text_config
    _say("Fun-Audio-Chat demo: speech in -> text + 25 Hz speech codes + 24 kHz audio out, streamed")
    _say(
        f"  model   tiny built-in (random weights, {n_params / 1e6:.2f} M parameters: LLM {text_cfg.num_hidden_layers} "
        f"layers x {text_cfg.hidden_size}, Speech Refined Head "
        f"{model.config.audio_config.crq_transformer_config.num_hidden_layers} layers). Its words are noise; "
        "the pipeline is the real one."
    )
    heard = f' ("{EXAMPLE_AUDIO_TEXT}")' if bundled else ""
    _say(f"  audio   {Path(audio_path).name}, {len(waveform) / TARGET_SAMPLING_RATE:.2f} s{heard}")
    _say("")
    _say("Streaming reply (each speech group = up to 5 codes = 0.2 s of speech):")


def _stream_demo_reply(chat, waveform, seed: int):
    """Print each event of the spoken turn as it comes; returns the turn's result and its number of speech groups."""
    from .voice_chat import AudioPiece, SpeechPiece, TextPiece, TurnEnd

    tokenizer = chat.processor.tokenizer
    special_ids = set(tokenizer.all_special_ids)
    result, groups = None, 0
    for event in chat.respond(waveform, seed=seed):
        if isinstance(event, TextPiece):
            if event.token_id in special_ids:
                piece = tokenizer.convert_ids_to_tokens(event.token_id)  # control tokens by name
            else:
                piece = repr(event.text)
            _say(f"  text   {piece}")
        elif isinstance(event, SpeechPiece):
            groups += 1
            _say(f"  speech {' '.join(f'{c:4d}' for c in event.codes)}")
        elif isinstance(event, AudioPiece) and event.audio.numel():
            _say(f"  audio  {event.audio.numel() / event.sample_rate:.2f} s ready (24 kHz)")
        elif isinstance(event, TurnEnd):
            result = event.result
    return result, groups


def _print_demo_reply(result, groups: int) -> None:
    _say("")
    _say(f"Reply text: {_printable(result.text)!r}")
    _say(
        f"Speech: {len(result.codes)} codes = {result.metrics.speech_seconds:.2f} s of speech at 25 Hz "
        f"(streamed in {groups} groups; first codes {result.codes[:10]}); prompt {result.metrics.prompt_tokens} tokens"
    )


def _save_demo_reply(out_dir: Path, result, audio_path) -> None:
    from .processing import save_audio

    _write_reply(out_dir, result.text, result.codes, model_name="tiny", audio=str(audio_path), detokenizer=None)
    save_audio(out_dir / "reply.wav", result.audio, result.sample_rate)
    _say(f"Saved reply.txt, speech_codes.json and reply.wav (the streamed audio) to {out_dir}")


def _print_demo_timings(startup: float | None, build_times: tuple[float, float], metrics) -> None:
    build_model, build_detokenizer = build_times
    _say("")
    _say("Timings (from the start of the turn)")
    if startup is not None:
        _say(f"  start-up, imports   {startup:6.2f} s (python, torch, transformers)")
    _say(f"  build tiny model    {build_model:6.2f} s")
    _say(f"  build detokenizer   {build_detokenizer:6.2f} s (tiny CosyVoice 3 flow + HiFT, random weights)")
    for label, seconds in (
        ("first text token", metrics.first_text_seconds),
        ("first speech group", metrics.first_speech_seconds),
        ("first audio chunk", metrics.first_audio_seconds),
    ):
        if seconds is not None:
            _say(f"  {label:<19} {seconds:6.2f} s")
    steps = metrics.completion_tokens
    rate = steps / metrics.total_seconds if metrics.total_seconds > 0 else float("inf")
    _say(
        f"  generation          {metrics.total_seconds:6.2f} s for {steps} steps ({rate:.1f} steps/s, audio "
        "rendered alongside)"
    )
    if metrics.real_time_factor is not None:
        _say(
            f"  real-time factor    {metrics.real_time_factor:6.2f} (turn time / {metrics.audio_seconds:.2f} s of "
            "reply audio)"
        )


# ------------------------------------------------------------------------------------------------ chat
def _load_native_detokenizer(spec: str, flag: str):
    """``tiny``, a CosyVoice 3 folder (official or converted) or a Hub id of one → CosyVoice3Detokenizer."""
    if spec == "tiny":
        from .tiny import tiny_detokenizer

        return tiny_detokenizer()
    from .token2wav import CosyVoice3Detokenizer

    try:
        return CosyVoice3Detokenizer.from_pretrained(os.path.expanduser(spec))
    except Exception as err:  # format, file and Hub errors: one line for the user
        raise CLIError(f"{flag} {spec}: could not load a CosyVoice 3 detokenizer: {_first_line(err)}") from err


def _find_detokenizer(args):
    """The detokenizer for reply.wav: ``--detokenizer`` (a CosyVoice 3 folder, official or converted, a Hub id,
    ``tiny``, or ``MODULE:FACTORY`` for any object with ``sampling_rate`` that maps codes to a waveform, see
    ``fun_audio_chat.processing.SpeechDetokenizer``), else ``--cosyvoice-dir`` (or $FUN_AUDIO_CHAT_COSYVOICE_DIR),
    else None."""
    spec = args.detokenizer
    if spec and (spec == "tiny" or ":" not in spec or Path(spec).expanduser().exists()):
        return _load_native_detokenizer(spec, "--detokenizer")
    if spec:
        return _detokenizer_from_factory(spec)
    model_dir = args.cosyvoice_dir or os.environ.get("FUN_AUDIO_CHAT_COSYVOICE_DIR")
    if not model_dir:
        return None
    if not Path(model_dir).is_dir():
        raise CLIError(f"--cosyvoice-dir {model_dir}: directory not found.")
    return _load_native_detokenizer(model_dir, "--cosyvoice-dir")


def _detokenizer_from_factory(spec: str):
    """``--detokenizer MODULE:FACTORY``: the object itself, or what calling it returns, if it is a detokenizer."""
    import importlib

    from .processing import SpeechDetokenizer

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CLIError(f"--detokenizer {spec}: expected MODULE:FACTORY, e.g. my_vocoder:build.")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise CLIError(f"--detokenizer {spec}: {err}") from err
    except Exception as err:  # the user's module failed while importing
        raise CLIError(f"--detokenizer {spec}: importing {module_name} failed: {type(err).__name__}: {err}") from err
    if isinstance(factory, SpeechDetokenizer):
        detokenizer = factory
    elif callable(factory):
        try:
            detokenizer = factory()
        except Exception as err:  # the user's factory: reported, not traced
            raise CLIError(f"--detokenizer {spec}: {attribute}() failed: {type(err).__name__}: {err}") from err
    else:
        detokenizer = None
    if not isinstance(detokenizer, SpeechDetokenizer):
        raise CLIError(f"--detokenizer {spec}: the object has no sampling_rate or is not callable.")
    return detokenizer


def _write_reply(
    out_dir: Path, text: str, codes: list[int], *, model_name: str, audio: str, detokenizer, voice=None
) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    (out_dir / "reply.txt").write_text(text + "\n", encoding="utf-8")
    written.append("reply.txt")
    if codes is not None:
        payload = {
            "model": model_name,
            "audio": audio,
            "text": text,
            "frame_rate_hz": SPEECH_FRAME_RATE,
            "num_codes": len(codes),
            "duration_s": len(codes) / SPEECH_FRAME_RATE,
            "codes": codes,
        }
        (out_dir / "speech_codes.json").write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append("speech_codes.json")
        if detokenizer is not None and codes:
            from .processing import save_audio

            spoken = detokenizer(codes) if voice is None else detokenizer(codes, voice=voice)
            save_audio(out_dir / "reply.wav", spoken, detokenizer.sampling_rate)
            written.append("reply.wav")
    return written


def _chat_voice(args, detokenizer):
    """``--voice``: a voice file, or the name of a voice of the detokenizer folder (``voices/``); None = default."""
    if args.voice is None:
        return None
    if detokenizer is None or not hasattr(detokenizer, "config"):
        raise CLIError(f"--voice {args.voice}: needs a CosyVoice 3 detokenizer for reply.wav (pass --detokenizer).")
    from .voices import UnknownVoiceError, choose_voice

    folder = args.detokenizer or args.cosyvoice_dir or os.environ.get("FUN_AUDIO_CHAT_COSYVOICE_DIR")
    folder = Path(folder).expanduser() if folder and Path(folder).expanduser().is_dir() else None
    try:
        return choose_voice(args.voice, detokenizer.config, folder)
    except (UnknownVoiceError, ValueError, OSError) as err:
        raise CLIError(f"--voice {args.voice}: {_first_line(err)}") from err


def cmd_chat(args) -> int:
    audio = _existing_audio_file(args.audio)
    from . import VoiceChat
    from .processing import TARGET_SAMPLING_RATE

    _set_threads(args.threads)
    device = _resolve_device(args.device)
    detokenizer = None if args.text_only else _find_detokenizer(args)
    voice = _chat_voice(args, detokenizer)
    t0 = time.perf_counter()
    model, processor = _load_model_or_fail(args.model, device, _resolve_dtype(args.dtype, device))
    t_load = time.perf_counter() - t0
    waveform = _load_audio_or_fail(processor, str(audio))
    speech = not args.text_only
    if speech and model.audio_invert_tower is None:
        raise CLIError(f"--model {args.model} has no Speech Refined Head (speech-to-text only); pass --text-only.")
    # reply.wav is rendered offline from the codes (the official offline schedule), so the turn streams no audio
    chat = VoiceChat(
        model,
        processor,
        system_prompt=args.system,
        speech=speech,
        max_new_tokens=args.max_new_tokens,
        **({"do_sample": False} if args.greedy else {}),
    )
    _say(
        f"[{args.model}: loaded in {t_load:.1f} s; {len(waveform) / TARGET_SAMPLING_RATE:.1f} s of audio; "
        f"{'text + speech' if speech else 'text only'}]",
        file=sys.stderr,
    )
    result = _stream_chat_reply(chat, _chat_content(waveform, args.prompt), args)
    if args.out:
        _write_chat_outputs(args, audio, result, detokenizer, voice)
    return 0


def _existing_audio_file(spec: str) -> Path:
    audio = Path(spec).expanduser()
    if not audio.exists():
        raise CLIError(f"--audio {spec}: audio file not found.")
    if audio.is_dir():
        raise CLIError(f"--audio {spec}: expected an audio file, got a directory.")
    return audio


def _chat_content(waveform, prompt: str | None) -> list[dict]:
    """The user turn: the loaded audio, then ``--prompt`` as a text item."""
    from .processing import TARGET_SAMPLING_RATE

    content = [{"type": "audio", "audio": waveform, "sampling_rate": TARGET_SAMPLING_RATE}]
    if prompt:
        content.append({"type": "text", "text": prompt})
    return content


def _stream_chat_reply(chat, content: list[dict], args):
    """Stream the reply text to stdout (or print it at the end with --no-stream), then a summary on stderr."""
    from .voice_chat import TextPiece, TurnEnd

    result = None
    for event in chat.respond(content, seed=args.seed):
        if isinstance(event, TextPiece) and event.text and not args.no_stream:
            sys.stdout.write(_printable(event.text))
            sys.stdout.flush()
        elif isinstance(event, TurnEnd):
            result = event.result
    _say(_printable(result.text) if args.no_stream else "")
    summary = f"[{result.metrics.total_seconds:.1f} s"
    if result.codes is not None:
        summary += f"; {len(result.codes)} speech codes = {result.metrics.speech_seconds:.1f} s of speech"
    _say(summary + "]", file=sys.stderr)
    return result


def _write_chat_outputs(args, audio: Path, result, detokenizer, voice) -> None:
    written = _write_reply(
        Path(args.out),
        result.text,
        result.codes,
        model_name=args.model,
        audio=str(audio),
        detokenizer=detokenizer,
        voice=voice,
    )
    _say(f"wrote {', '.join(written)} to {args.out}", file=sys.stderr)
    if not args.text_only and detokenizer is None:
        _say(
            "no detokenizer: reply.wav not written (pass --detokenizer with a CosyVoice 3 folder, a converted "
            "detokenizer or a Hub id to get audio from the speech codes)",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------------------------ tokenize-speech
def _audio_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def _dataset_rows(source: str, split: str, audio_column: str, id_column: str | None):
    from .processing.datasets import DatasetReadError, audio_dataset_rows

    try:
        return audio_dataset_rows(source, split, audio_column, id_column)
    except ImportError as err:
        raise CLIError("--dataset needs the `datasets` package (pip install 'fun-audio-chat[train]').") from err
    except DatasetReadError as err:
        if err.argument is None:
            raise CLIError(err.reason) from err
        raise CLIError(f"--{err.argument.replace('_', '-')} {err.value}: {err.reason}") from err


def _speech_tokenizer(args):
    from .processing import S3SpeechTokenizer

    try:
        if args.random_weights:
            _say(
                "warning: --random-weights: the speech tokenizer has random weights; the codes are meaningless "
                "(for testing the pipeline only).",
                file=sys.stderr,
            )
            if args.random_weights == "tiny":
                from .tiny import tiny_s3_speech_tokenizer

                return tiny_s3_speech_tokenizer(batch_size=args.batch_size, device=args.device)
            return S3SpeechTokenizer.random(batch_size=args.batch_size, device=args.device)
        return S3SpeechTokenizer.from_pretrained(args.tokenizer, batch_size=args.batch_size, device=args.device)
    except ImportError as err:
        raise CLIError(str(err)) from err
    except (OSError, FileNotFoundError) as err:
        raise CLIError(f"--tokenizer {args.tokenizer}: {err}") from err


def cmd_tokenize_speech(args) -> int:
    items = _tokenize_speech_items(args)
    out_path = Path(args.out)
    if out_path.exists() and not args.overwrite:
        raise CLIError(f"--out {args.out} exists; pass --overwrite to replace it.")
    _set_threads(args.threads)
    tokenizer = _speech_tokenizer(args)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # hidden and unique, so it never replaces a file of the user's; removed whatever stops the run
    tmp_path = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        totals = _tokenize_into(args, items, tokenizer, tmp_path)
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    _say(
        f"tokenized {totals.done} clip(s), {totals.seconds:.1f} s of audio -> {totals.codes} codes in "
        f"{totals.elapsed:.1f} s; wrote {out_path}" + (f" ({totals.skipped} skipped)" if totals.skipped else "")
    )
    return 0


def _tokenize_speech_items(args) -> list[tuple[str, object]]:
    """``(id, audio)`` of every clip to tokenize: the dataset's rows, or the audio files under INPUT."""
    if args.dataset:
        items = _dataset_rows(args.input, args.split, args.audio_column, args.id_column)
    else:
        source = Path(args.input).expanduser()
        if not source.exists():
            raise CLIError(f"{args.input}: no such file or folder.")
        extensions = tuple(e if e.startswith(".") else "." + e for e in args.extensions.lower().split(","))
        files = _audio_files(source, extensions)
        root = source if source.is_dir() else source.parent
        items = [(str(f.relative_to(root)), str(f)) for f in files]
    if not items:
        raise CLIError(f"{args.input}: no audio found (extensions {args.extensions}).")
    return items


@dataclass
class _TokenizeTotals:
    done: int = 0
    skipped: int = 0
    codes: int = 0
    seconds: float = 0.0
    elapsed: float = 0.0


def _tokenize_into(args, items, tokenizer, tmp_path: Path) -> _TokenizeTotals:
    """Tokenize ``items`` batch by batch into ``tmp_path``, one JSON line per clip."""
    from tqdm.auto import tqdm

    from .processing import TARGET_SAMPLING_RATE

    totals = _TokenizeTotals()
    t0 = time.perf_counter()
    with open(tmp_path, "w", encoding="utf-8") as handle, tqdm(total=len(items), desc="tokenizing", unit="clip") as bar:
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            kept, waveforms = _load_batch(batch, args.skip_errors, totals, tqdm.write)
            codes = tokenizer(waveforms, sampling_rate=TARGET_SAMPLING_RATE) if waveforms else []
            for item_id, waveform, clip_codes in zip(kept, waveforms, codes):
                seconds = len(waveform) / TARGET_SAMPLING_RATE
                record = {
                    "id": item_id,
                    "num_codes": len(clip_codes),
                    "duration_s": round(seconds, 4),
                    "codes": clip_codes,
                }
                handle.write(json.dumps(record) + "\n")
                totals.done += 1
                totals.codes += len(clip_codes)
                totals.seconds += seconds
            bar.update(len(batch))
    totals.elapsed = time.perf_counter() - t0
    return totals


def _load_batch(batch, skip_errors: bool, totals: _TokenizeTotals, report) -> tuple[list, list]:
    """The ids and waveforms of the batch's readable clips; an unreadable one stops the run, or with --skip-errors
    is counted in ``totals`` and reported through ``report``."""
    from .processing import AudioInputError, load_audio

    kept, waveforms = [], []
    for item_id, audio in batch:
        try:
            waveforms.append(load_audio(audio, name=str(item_id)))
            kept.append(item_id)
        except AudioInputError as err:
            if not skip_errors:
                raise CLIError(f"{err} (pass --skip-errors to skip unreadable audio)") from err
            totals.skipped += 1
            report(f"skipped {item_id}: {err}", file=sys.stderr)
    return kept, waveforms


# ------------------------------------------------------------------------------------------------ merge
def cmd_merge(args) -> int:
    tuned, base, out = _merge_paths(args)
    from .hub import write_model_card
    from .trainers.merging import PickleCheckpointError, merge_weights

    t0 = time.perf_counter()
    try:
        result, manifest = merge_weights(
            str(tuned),
            base,
            args.alpha,
            output_dir=str(out),
            on_shape_mismatch=args.on_shape_mismatch,
            overwrite=args.overwrite,
            show_progress=True,
            base_from_hub=args.base_from_hub,
        )
    except PickleCheckpointError as err:
        raise CLIError(str(err)) from err
    except (OSError, ValueError) as err:  # missing or truncated shards, bad headers, overlapping output
        raise CLIError(f"merge failed: {_first_line(err)}") from err
    if not args.no_model_card:
        write_model_card(out)
    size = sum(f.stat().st_size for f in Path(result).rglob("*.safetensors"))
    _say(
        f"merged {len(manifest['merged'])} tensors as {args.alpha:g} * tuned + {1 - args.alpha:g} * base; kept "
        f"{len(manifest['kept_from_tuned'])} from the tuned model; wrote {result} ({size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if manifest.get("shape_mismatch_kept"):
        _say(
            f"kept {len(manifest['shape_mismatch_kept'])} tensor(s) whose shapes differ from the base: "
            f"{manifest['shape_mismatch_kept'][:5]}"
        )
    return 0


def _merge_paths(args) -> tuple[Path, str, Path]:
    """The checked inputs of ``merge``: the tuned checkpoint, the base (a local path or a Hub id) and the output."""
    tuned = Path(args.tuned).expanduser()
    if not tuned.exists():
        raise CLIError(f"--tuned {args.tuned}: checkpoint not found.")
    base_path = Path(args.base).expanduser()
    if args.base_from_hub:
        if args.base.startswith((".", "/", "~")) or args.base.count("/") != 1:
            raise CLIError(f"--base {args.base}: --base-from-hub needs a Hub repo id like 'org/name'.")
    elif not base_path.exists():
        hint = " (to download a Hub repo, add --base-from-hub)" if args.base.count("/") == 1 else ""
        raise CLIError(f"--base {args.base}: checkpoint not found{hint}.")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {args.out} exists; pass --overwrite to replace it.")
    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha {args.alpha}: must be between 0 and 1.")
    return tuned, args.base if args.base_from_hub else str(base_path), out


# ------------------------------------------------------------------------------------------------ convert-detokenizer
def cmd_convert_detokenizer(args) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{args.out}: folder exists and is not empty (pass --overwrite to replace its files).")
    t0 = time.perf_counter()
    speaker = _read_speaker_embedding(args.speaker_embedding) if args.speaker_embedding else None
    from .token2wav.convert_official import convert_official_checkpoint

    try:
        detokenizer = convert_official_checkpoint(os.path.expanduser(args.source), out, speaker)
    except Exception as err:  # format, file and Hub errors: one line for the user
        raise CLIError(f"SRC {args.source}: could not convert a CosyVoice 3 checkpoint: {_first_line(err)}") from err
    flow = sum(p.numel() for p in detokenizer.flow.parameters())
    hift = sum(p.numel() for p in detokenizer.hift.parameters())
    _say(
        f"wrote {out}/config.json and model.safetensors (flow {flow:,} + HiFT {hift:,} parameters) in "
        f"{time.perf_counter() - t0:.1f} s; load it with CosyVoice3Detokenizer.from_pretrained({str(out)!r})"
    )
    _convert_speakers(args, out, detokenizer.config)
    return 0


def _read_speaker_embedding(path: str):
    """``--speaker-embedding FILE``: the one 192-value tensor of a safetensors file."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise CLIError(f"--speaker-embedding {path}: {_first_line(err)}") from err
    if len(tensors) != 1 or next(iter(tensors.values())).numel() != 192:
        raise CLIError(f"--speaker-embedding {path}: expected one tensor of 192 values.")
    return next(iter(tensors.values()))


def _convert_speakers(args, out: Path, config) -> None:
    """The released speakers (``--speakers FILE``, else a spk2info.pt in SRC) as ``OUT/voices/<name>.safetensors``."""
    from .voices import convert_official_speakers, find_official_speakers

    source = args.speakers or (args.source if Path(args.source).expanduser().is_dir() else None)
    if args.speakers is None and (source is None or find_official_speakers(source) is None):
        return
    try:
        written = convert_official_speakers(Path(source).expanduser(), out, config=config)
    except (ValueError, OSError) as err:
        raise CLIError(f"--speakers {source}: {_first_line(err)}") from err
    names = ", ".join(path.stem for path in written)
    _say(f"wrote {len(written)} voice(s) with their prompts to {out}/voices/: {names} (chat/serve --voice NAME)")


# ------------------------------------------------------------------------------------------------ clone-voice
def cmd_clone_voice(args) -> int:
    out = _voice_file_to_write(args.out, args.overwrite)
    encoders = args.encoders or os.environ.get("FUN_AUDIO_CHAT_COSYVOICE_DIR")
    if not encoders:
        raise CLIError(
            "--encoders: pass the official CosyVoice 3 folder (it holds campplus.onnx and speech_tokenizer_v3.onnx), "
            "or 'tiny' for the tiny built-in detokenizer."
        )
    _set_threads(args.threads)
    from .voices import VoiceCloningError, load_voice_cloner

    try:
        cloner = load_voice_cloner(encoders)
    except (ImportError, ValueError, OSError) as err:
        raise CLIError(f"--encoders {encoders}: {_first_line(err)}") from err
    t0 = time.perf_counter()
    try:
        voice = cloner.clone(args.clip, name=args.name)
    except VoiceCloningError as err:
        raise CLIError(str(err)) from err
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    voice.save(out)
    _say(
        f"wrote voice {voice.name!r} to {out}: {voice.prompt_tokens} prompt codes "
        f"({voice.prompt_tokens / SPEECH_FRAME_RATE:.1f} s), {voice.prompt_mel.shape[0]} mel frames, a "
        f"{voice.speaker_embedding.numel()}-value speaker embedding; cloned in {seconds:.2f} s"
    )
    return 0


def _voice_file_to_write(spec: str, overwrite: bool) -> Path:
    out = Path(spec).expanduser()
    if not out.name.endswith(".safetensors"):
        raise CLIError(f"OUT {spec}: a voice file ends in .safetensors (e.g. {out.stem or 'voice'}.safetensors).")
    if out.exists() and not overwrite:
        raise CLIError(f"OUT {spec}: file exists (pass --overwrite to replace it).")
    return out


# ------------------------------------------------------------------------------------------------ serve
def _serve_detokenizer(spec: str | None, model_spec: str):
    """Speech codes → audio for ``serve``: ``none``, a CosyVoice 3 directory, or by default the tiny random one
    for the tiny model. None = no detokenizer (the server then answers with text only)."""
    if spec == "none" or (spec is None and model_spec != "tiny"):
        return None
    if spec is None or spec == "tiny":
        from .tiny import tiny_detokenizer

        return tiny_detokenizer(seed=0)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CLIError(f"--detokenizer {spec}: directory not found (expected a CosyVoice 3 token-to-wave model).")
    try:
        from . import CosyVoice3Detokenizer

        return CosyVoice3Detokenizer.from_pretrained(str(path))
    except (ImportError, OSError, ValueError) as err:
        raise CLIError(f"--detokenizer {spec}: could not load it: {err}") from err


def _serve_voices(args, detokenizer):
    """The voices both APIs offer by name: the detokenizer folder's ``voices/`` (or the speakers of an official
    folder's spk2info.pt) and every ``--voice NAME=CLIP_OR_VOICE_FILE`` (clips are cloned now, once)."""
    if detokenizer is None:
        if args.voice:
            raise CLIError("--voice: this server has no detokenizer (text replies only); pass --detokenizer DIR.")
        return None
    from .voices import VoiceRegistry, load_voice_cloner

    registry = VoiceRegistry(config=getattr(detokenizer, "config", None))
    folder = args.detokenizer if args.detokenizer not in (None, "tiny", "none") else None
    try:
        if folder:
            registry.add_folder(folder)
    except (ValueError, OSError) as err:
        raise CLIError(f"--detokenizer {folder}: its voices: {_first_line(err)}") from err
    encoders = args.voice_encoders or folder or "tiny"

    def cloner():  # built only when a --voice names a clip
        try:
            return load_voice_cloner(encoders, num_codes=detokenizer.config.flow.vocab_size)
        except (ImportError, ValueError, OSError) as err:
            raise CLIError(f"--voice-encoders {encoders}: {_first_line(err)}") from err

    for spec in args.voice or []:
        try:
            registry.add_spec(spec, cloner)
        except (ValueError, OSError) as err:
            raise CLIError(f"--voice {spec}: {_first_line(err)}") from err
    if getattr(args, "chunked_synthesis", False) and hasattr(detokenizer, "prepare_voice"):
        for name in registry.names[1:]:  # each voice's prompt chunks encoded now, not by its first reply
            detokenizer.prepare_voice(registry.get(name))
    return registry


def _check_compile_options(args) -> None:
    """The ``--compile-*`` options refine ``--compile``; alone they would silently do nothing."""
    if args.compile:
        if args.compile_cache is not None and Path(args.compile_cache).expanduser().is_dir():
            raise CLIError(
                f"--compile-cache {args.compile_cache}: is a directory; pass a file path (e.g. compile.bin)."
            )
        return
    for option, value in (
        ("--compile-context", args.compile_context),
        ("--compile-cache", args.compile_cache),
        ("--compile-backend", args.compile_backend),
    ):
        if value is not None:
            raise CLIError(f"{option} applies to compiled decoding: add --compile (or drop {option}).")


def _serve_compile_settings(args) -> dict:
    """The ``ServingEngine`` keyword arguments of ``--compile`` (none without it)."""
    if not args.compile:
        return {}
    from transformers import CompileConfig

    return {
        "compile_config": CompileConfig(backend=args.compile_backend or "inductor"),
        "compile_context": args.compile_context,
        "compile_cache": args.compile_cache,
    }


def _warm_up_serve_engine(engine) -> None:
    """Compile every batch bucket before the server listens (``--compile``), and say how long it took."""
    _say(
        f"fun-audio-chat serve: compiling decoding for batches of up to {engine.max_batch_size} "
        f"({engine.max_batch_size} slots of {engine.compile_context} positions, "
        f"{engine.slot_cache_bytes / 1e6:.1f} MB of cache each)...",
        file=sys.stderr,
    )
    try:
        engine.start()
    except RuntimeError as err:
        raise CLIError(f"--compile: {_first_line(err, limit=500)}") from err
    timings = ", ".join(f"batch {size} {seconds:.1f} s" for size, seconds in engine.warm_up_seconds.items())
    cache = f" (from --compile-cache {engine.compile_cache})" if engine.compile_cache_loaded else ""
    _say(f"fun-audio-chat serve: compiled{cache}: {timings}", file=sys.stderr)


def cmd_serve(args) -> int:
    _check_compile_options(args)
    try:
        import uvicorn

        from .serving import ServingEngine, create_app
    except ImportError as err:
        raise CLIError(
            f"serve needs FastAPI, uvicorn and prometheus_client ({err}): pip install 'fun-audio-chat[serve]'."
        ) from err
    _check_port_is_free(args.host, args.port)
    _set_threads(args.threads)
    device = _resolve_device(args.device)
    model, processor = _load_model_or_fail(args.model, device, _resolve_dtype(args.dtype, device))
    detokenizer = _serve_detokenizer(args.detokenizer, args.model)
    voices = _serve_voices(args, detokenizer)
    engine = ServingEngine(
        model,
        processor,
        detokenizer,
        max_batch_size=args.max_batch_size,
        batch_window=args.batch_window_ms / 1000,
        chunked_synthesis=args.chunked_synthesis,
        synthesis_workers=args.synthesis_workers,
        synthesis_hop_growth=args.synthesis_hop_growth,
        **_serve_compile_settings(args),
    )
    if engine.compiled:
        _warm_up_serve_engine(engine)
    model_id = args.model_id or (Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model)
    app = create_app(
        engine,
        model_id,
        default_max_tokens=args.max_new_tokens,
        max_audio_seconds=args.max_audio_seconds,
        voices=voices,
    )
    _print_serve_banner(args, model_id, engine, voices)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _check_port_is_free(host: str, port: int) -> None:
    """Fail with one line before the model loads, rather than after, when the address is taken."""
    import socket

    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as err:
        raise CLIError(
            f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host."
        ) from err
    finally:
        probe.close()


def _print_serve_banner(args, model_id: str, engine, voices) -> None:
    mode = "text + speech" if engine.can_speak else "text only (no detokenizer: pass --detokenizer DIR)"
    if voices is not None and len(voices):
        mode += f" in voices {', '.join(voices.names)}"
    if engine.compiled:
        mode += f", compiled decoding ({engine.compile_context} positions per request)"
    _say(
        f"fun-audio-chat serve: model {model_id!r}, {mode}; voice page http://{args.host}:{args.port}/ , "
        f"OpenAI API http://{args.host}:{args.port}/v1 , metrics /metrics",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------ parser
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fun-audio-chat")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _add_device_options(parser) -> None:
    """``--device`` and ``--dtype``, for the commands that load the model."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )


def _add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


def _examples(*command_lines: str) -> str:
    """An ``examples:`` epilog (for a parser with ``RawDescriptionHelpFormatter``), one command a line."""
    return "examples:\n" + "\n".join(f"  {line}" for line in command_lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fun-audio-chat",
        description="Fun-Audio-Chat (speech in; text and 25 Hz speech tokens out) on transformers 5.",
        epilog="Run `fun-audio-chat COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"fun-audio-chat {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(commands)
    _add_chat_parser(commands)
    _add_convert_detokenizer_parser(commands)
    _add_clone_voice_parser(commands)
    _add_tokenize_speech_parser(commands)
    _add_merge_parser(commands)
    _add_serve_parser(commands)
    return parser


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="streaming speech-to-speech on a tiny built-in model (no downloads)",
        description="Speech-to-speech on a tiny built-in model with the bundled speech clip: the text pieces and the "
        "25 Hz speech-code groups are printed as they are generated, then timings. The tiny model has random "
        "weights (its words are noise); everything else is the real pipeline.",
    )
    demo.add_argument("--audio", help="use this audio file instead of the bundled clip")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=24, help="LLM steps (each brings 5 speech codes)")
    demo.add_argument("--seed", type=int, default=3, help="weights and sampling seed")
    demo.add_argument("--out", help="also save reply.txt, speech_codes.json and reply.wav to this folder")
    demo.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads (tiny models are fastest on one)"
    )
    demo.set_defaults(func=cmd_demo)


def _add_chat_parser(commands) -> None:
    chat = commands.add_parser(
        "chat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="answer one audio file (text, speech codes, wav)",
        description="Answer a spoken question. Streams the reply text to stdout and, with --out, writes reply.txt, "
        "speech_codes.json (25 Hz S3 codes) and reply.wav (only when a detokenizer is given: --detokenizer).",
        epilog=_examples(
            "fun-audio-chat chat --model FunAudioLLM/Fun-Audio-Chat-8B --audio question.wav --out reply/",
            "fun-audio-chat chat --model tiny --audio question.wav --text-only",
        ),
    )
    chat.add_argument("--model", required=True, help="checkpoint directory, Hub repo id, or 'tiny' (built-in)")
    chat.add_argument("--audio", required=True, help="audio file (wav, flac, ogg, mp3 ...), any sampling rate")
    chat.add_argument("--text-only", action="store_true", help="answer with text only (speech-to-text prompt)")
    chat.add_argument("--out", help="folder for reply.txt, speech_codes.json and reply.wav")
    chat.add_argument("--prompt", help="text instruction placed after the audio in the user turn")
    chat.add_argument("--system", help="system prompt (default: the official speech-out or text-out prompt)")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512, help="maximum LLM steps of the reply")
    chat.add_argument("--greedy", action="store_true", help="greedy text decoding (speech codes stay sampled)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of streaming")
    _add_device_options(chat)
    chat.add_argument(
        "--cosyvoice-dir",
        help="official CosyVoice 3 folder for reply.wav (same as --detokenizer DIR; "
        "default: $FUN_AUDIO_CHAT_COSYVOICE_DIR)",
    )
    chat.add_argument(
        "--detokenizer",
        metavar="PATH",
        help="speech codes -> reply.wav: a CosyVoice 3 folder (official, or converted with "
        "convert-detokenizer), a Hub id of one, 'tiny' (random weights), or MODULE:FACTORY for "
        "another codes-to-wave object with sampling_rate",
    )
    chat.add_argument(
        "--voice",
        metavar="NAME_OR_FILE",
        help="speak reply.wav in this voice: a .safetensors voice file (clone-voice) or the name of a voice in the "
        "detokenizer folder's voices/ (default: the detokenizer's own speaker)",
    )
    _add_threads_option(chat)
    chat.set_defaults(func=cmd_chat)


def _add_convert_detokenizer_parser(commands) -> None:
    convert = commands.add_parser(
        "convert-detokenizer",
        help="official CosyVoice 3 folder -> safetensors detokenizer folder",
        description="Read an official CosyVoice 3 folder (cosyvoice3.yaml read as data, flow.pt and hift.pt read as "
        "weights only) or a Hub id of one, and write config.json + model.safetensors for "
        "CosyVoice3Detokenizer.from_pretrained. Only the flow and vocoder are kept.",
    )
    convert.add_argument("source", metavar="SRC", help="official CosyVoice 3 folder or Hub id")
    convert.add_argument("out", metavar="OUT", help="output folder")
    convert.add_argument(
        "--speaker-embedding",
        metavar="FILE",
        help="safetensors file with one 192-value speaker embedding to make the default voice",
    )
    convert.add_argument(
        "--speakers",
        metavar="FILE",
        help="the released speaker table (Fun-Audio-Chat's utils/new_spk2info.pt) to write as voices/ with their "
        "full prompts (default: a spk2info.pt found in SRC)",
    )
    convert.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    convert.set_defaults(func=cmd_convert_detokenizer)


def _add_clone_voice_parser(commands) -> None:
    clone = commands.add_parser(
        "clone-voice",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a 3-30 s clip of one speaker -> a voice file",
        description="Clone a voice from a 3-30 s clip of one speaker (any common format and sampling rate): its S3 "
        "speech codes and CosyVoice 3 mel become the prompt the flow continues from, CAM++ gives its speaker "
        "embedding. The voice file (safetensors) is used with chat --voice FILE and serve --voice NAME=FILE.",
        epilog=_examples(
            "fun-audio-chat clone-voice anna.wav anna.safetensors --encoders CosyVoice3-0.5B/",
            "fun-audio-chat clone-voice anna.wav anna.safetensors --encoders tiny",
        ),
    )
    clone.add_argument("clip", metavar="CLIP", help="audio file of one speaker, 3 to 30 s")
    clone.add_argument("out", metavar="OUT", help="voice file to write (.safetensors)")
    clone.add_argument(
        "--encoders",
        metavar="DIR",
        help="official CosyVoice 3 folder with campplus.onnx and speech_tokenizer_v3.onnx, or 'tiny' (random, for "
        "the tiny detokenizer) (default: $FUN_AUDIO_CHAT_COSYVOICE_DIR)",
    )
    clone.add_argument("--name", help="the voice's name (default: the clip's file name)")
    clone.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _add_threads_option(clone)
    clone.set_defaults(func=cmd_clone_voice)


def _add_tokenize_speech_parser(commands) -> None:
    tok = commands.add_parser(
        "tokenize-speech",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="batch S3Tokenizer: audio folder or dataset -> JSON lines of 25 Hz codes",
        description="Turn audio into 25 Hz CosyVoice 3 speech codes (S3Tokenizer v3, 6561 codes) in batches, e.g. to "
        "build training data for spoken replies. Writes one JSON object per clip: "
        '{"id", "num_codes", "duration_s", "codes"}. Needs the optional s3tokenizer package '
        "(pip install --no-deps s3tokenizer==0.3.0 && pip install onnx einops).",
        epilog=_examples(
            "fun-audio-chat tokenize-speech wavs/ --out codes.jsonl --tokenizer speech_tokenizer_v3.onnx",
            "fun-audio-chat tokenize-speech my_dataset/ --dataset --split train --audio-column audio --out codes.jsonl",
        ),
    )
    tok.add_argument("input", help="audio folder (searched recursively), one audio file, or with --dataset a dataset")
    tok.add_argument("--out", required=True, help="output .jsonl file")
    tok.add_argument(
        "--tokenizer",
        default="speech_tokenizer_v3_25hz",
        help="S3Tokenizer weights: a local .onnx/.pt/.safetensors file or an s3tokenizer model name "
        "(downloaded from modelscope) (default: %(default)s)",
    )
    tok.add_argument(
        "--random-weights",
        nargs="?",
        const="full",
        choices=["full", "tiny"],
        help="random weights instead of --tokenizer (tests only: the codes are meaningless)",
    )
    tok.add_argument(
        "--dataset",
        action="store_true",
        help="INPUT is a dataset: a save_to_disk folder, a csv/json/jsonl/parquet file, or a Hub id",
    )
    tok.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    tok.add_argument("--audio-column", default="audio", help="dataset column with the audio (default: %(default)s)")
    tok.add_argument("--id-column", help="dataset column used as the record id (default: the row index)")
    tok.add_argument(
        "--extensions",
        default=",".join(e[1:] for e in AUDIO_EXTENSIONS),
        help="audio file extensions searched in a folder (default: %(default)s)",
    )
    tok.add_argument(
        "--batch-size", type=_positive_int, default=8, help="clips per tokenizer batch (default: %(default)s)"
    )
    tok.add_argument("--device", default=None, help="torch device of the tokenizer (default: cpu)")
    tok.add_argument("--skip-errors", action="store_true", help="skip unreadable audio instead of stopping")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_threads_option(tok)
    tok.set_defaults(func=cmd_tokenize_speech)


def _add_merge_parser(commands) -> None:
    merge = commands.add_parser(
        "merge",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="Core-Cocktail merge of checkpoints on disk",
        description="Core-Cocktail merge M = alpha * tuned + (1 - alpha) * base of a fine-tuned Fun-Audio-Chat "
        "checkpoint with its base text LLM (a Qwen3 causal-LM checkpoint, or a Hub id). Merges shard by shard with "
        "bounded memory, keeps the audio encoders and the Speech Refined Head from the tuned model, copies the config "
        "and processor files, and writes merge_manifest.json and a model card. Safetensors only.",
        epilog=_examples(
            "fun-audio-chat merge --tuned runs/stage1/final --base runs/base-llm --alpha 0.5 --out merged/",
            "fun-audio-chat merge --tuned runs/stage1/final --base Qwen/Qwen3-8B --base-from-hub --out merged/",
        ),
    )
    merge.add_argument("--tuned", required=True, help="fine-tuned Fun-Audio-Chat checkpoint directory (M1)")
    merge.add_argument("--base", required=True, help="base LLM checkpoint directory or Hub repo id (M0)")
    merge.add_argument("--out", required=True, help="output directory (written atomically)")
    merge.add_argument("--alpha", type=float, default=0.5, help="weight of the tuned model (default: %(default)s)")
    merge.add_argument(
        "--on-shape-mismatch",
        default="error",
        choices=["error", "keep_tuned"],
        help="what to do with tensors whose shapes differ, e.g. a resized vocabulary (default: %(default)s)",
    )
    merge.add_argument(
        "--base-from-hub",
        action="store_true",
        help="--base is a Hub repo id to download (otherwise it must be a local checkpoint)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    merge.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    merge.set_defaults(func=cmd_merge)


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="voice chat page + OpenAI-compatible audio API",
        description="Serve a model over HTTP: a voice chat page at / (microphone, voice detection or push-to-talk, "
        "streamed text and audio, barge-in), an OpenAI-compatible POST /v1/chat/completions (input_audio parts, "
        "modalities text/audio, streaming, tools) and GET /v1/models, per-turn metrics at /metrics. Requests that "
        "arrive together are decoded as one batch. With no arguments: the tiny built-in model and a tiny random "
        "detokenizer (no downloads; their words and sounds are noise).",
        epilog=_examples(
            "fun-audio-chat serve",
            "fun-audio-chat serve --model FunAudioLLM/Fun-Audio-Chat-8B --detokenizer cosyvoice3/ --port 8000",
        ),
    )
    serve.add_argument("--model", default="tiny", help="checkpoint directory, Hub repo id, or 'tiny' (default)")
    _add_serve_speech_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--model-id", help="model name in the API (default: the --model value)")
    serve.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="reply length when a request gives no max_tokens (default: %(default)s)",
    )
    _add_serve_batching_options(serve)
    serve.add_argument(
        "--max-audio-seconds",
        type=float,
        default=120.0,
        help="longest accepted audio clip in a request (default: %(default)s)",
    )
    _add_device_options(serve)
    serve.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default: %(default)s)",
    )
    serve.set_defaults(func=cmd_serve)


def _add_serve_speech_options(serve) -> None:
    """How ``serve`` speaks: the detokenizer and the voices it offers."""
    serve.add_argument(
        "--detokenizer",
        metavar="DIR",
        help="CosyVoice 3 token-to-wave directory for spoken replies; 'none' for text only "
        "(default: a tiny random one with --model tiny, none otherwise)",
    )
    serve.add_argument(
        "--voice",
        action="append",
        metavar="NAME=CLIP_OR_VOICE_FILE",
        help="offer a voice by name (repeatable): a .safetensors voice file, or a 3-30 s clip cloned at start-up; the "
        "detokenizer folder's voices/ are offered too (audio.voice / session.audio.output.voice pick one)",
    )
    serve.add_argument(
        "--voice-encoders",
        metavar="DIR",
        help="CosyVoice 3 folder with campplus.onnx and speech_tokenizer_v3.onnx for cloning --voice clips "
        "(default: the --detokenizer folder; the tiny cloner with the tiny detokenizer)",
    )


def _add_serve_batching_options(serve) -> None:
    """How ``serve`` shares the model between requests: batched decoding and speech synthesis."""
    serve.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together (default: 8)")
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=25.0,
        help="how long a request waits for others to join its batch (default: %(default)s)",
    )
    serve.add_argument(
        "--chunked-synthesis",
        action="store_true",
        help="render reply audio with the cached chunk-causal flow: more spoken throughput under load, first audio "
        "after 28 codes instead of 18 (docs/serve.md)",
    )
    serve.add_argument(
        "--synthesis-workers",
        type=_positive_int,
        default=1,
        help="speech threads rendering reply audio side by side; more use idle cores under load (default: 1)",
    )
    serve.add_argument(
        "--synthesis-hop-growth",
        type=_positive_int,
        default=1,
        help="multiply each reply's synthesis hop by this after every call (1: the official fixed 15 codes; 2: "
        "first audio as early, several times less synthesis work per reply; docs/serve.md)",
    )
    _add_serve_compile_options(serve)


def _add_serve_compile_options(serve) -> None:
    """Compiled decoding in ``serve``: fixed cache slots and graphs compiled at start (docs/serve.md)."""
    serve.add_argument(
        "--compile",
        action="store_true",
        help="decode with compiled graphs on --max-batch-size fixed cache slots, compiled for every batch size at "
        "start (before the server listens); greedy replies are unchanged (docs/serve.md)",
    )
    serve.add_argument(
        "--compile-context",
        type=_at_least(2),
        metavar="N",
        help="with --compile: positions (prompt + reply) of one request; longer requests are refused. Every slot "
        "allocates its whole cache for N up front (default: 2048, at most the model's context)",
    )
    serve.add_argument(
        "--compile-cache",
        metavar="PATH",
        help="with --compile: torch compile cache file, loaded at start when it exists and saved after the warm-up, "
        "so the next start skips code generation",
    )
    serve.add_argument(
        "--compile-backend",
        metavar="NAME",
        help="with --compile: torch.compile backend (default: inductor; eager only traces, for checks)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"fun-audio-chat {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as err:  # our libraries' input errors (they name the problem): one line, no trace
        print(f"fun-audio-chat {args.command}: error: {_first_line(err, limit=500)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fun-audio-chat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
