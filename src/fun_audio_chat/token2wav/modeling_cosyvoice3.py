# Copyright 2026 The fun_audio_chat authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""``CosyVoice3Detokenizer``: 25 Hz speech codes → 24 kHz waveform, offline (batched) and streaming.

Offline follows the official Fun-Audio-Chat detokenizer: 750-token segments (a last segment under 50 tokens is
merged with the previous one and the pair halved), each rendered in one finalizing call with the fixed noise;
rows of different lengths are batched through the flow and each equals its solo result.

Streaming (:meth:`CosyVoice3Detokenizer.streaming_session`) offers the official per-call token-to-wave
(``step``) and the official web-demo schedule (``push``/``finish``); with ``chunked=True`` the flow uses
chunk-causal attention and keeps the attention cache of earlier chunks, and the vocoder always renders only a
window around the new frames instead of the whole history.

Every entry point speaks in a voice (:class:`~fun_audio_chat.token2wav.CosyVoice3Voice`, ``voice=``): its
embedding conditions the flow and its prompt (codes + mel) goes before the codes of every flow call, as CosyVoice 3's
own ``token2wav`` takes it; rows and sessions with different voices share batches. See ``docs/token2wav.md``.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import auto_docstring

from .configuration_cosyvoice3 import CosyVoice3Config
from .dit import DiffusionTransformer
from .flow import CosyVoice3Flow, FlowCache, FlowPrompt
from .hift import HiFTGenerator, Snake
from .loading import (
    CONVERTED_WEIGHTS,
    SPEAKER_FILE,
    CheckpointFormatError,
    _find_official_yaml,
    config_from_official_yaml,
    load_official_weights,
    official_state_dict,
    resolve_checkpoint,
)
from .noise import fixed_noise
from .voice import CosyVoice3Voice

DEFAULT_SPEAKER_ASSET = Path(__file__).resolve().parent.parent / "assets" / "cosyvoice3_default_speaker.safetensors"
# Frames of mel the windowed vocoder re-renders before the first new frame: more than its left receptive field
# (about 26 frames at the released sizes: the F0 convs, the upsampling convs and the dilated residual blocks).
VOCODER_CONTEXT_FRAMES = 32


def split_segments(num_tokens: int, segment: int = 750, min_last: int = 50) -> list[tuple[int, int]]:
    """``(start, end)`` pieces of the official offline schedule: ``segment``-token pieces; a last piece shorter
    than ``min_last`` is merged with the previous one and the pair is split into two halves."""
    if num_tokens <= 0:
        return []
    bounds = [(start, min(start + segment, num_tokens)) for start in range(0, num_tokens, segment)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        start = bounds[-2][0]
        middle = start + (num_tokens - start) // 2
        bounds = bounds[:-2] + [(start, middle), (middle, num_tokens)]
    return bounds


class VoiceConditioning:
    """A voice as the flow takes it, on the model's device: the speaker embedding (1, 192), the prompt (or None),
    and, built on first use and then kept, the voice's chunk-causal prompt cache (see
    :meth:`CosyVoice3Flow.prompt_cache`)."""

    def __init__(self, speaker: torch.Tensor, prompt: FlowPrompt | None, voice: CosyVoice3Voice | None = None):
        self.speaker = speaker
        self.prompt = prompt
        self.voice = voice
        self._prompt_cache: FlowCache | None = None

    @property
    def prompt_tokens(self) -> int:
        return 0 if self.prompt is None else len(self.prompt.tokens)

    def chunked_cache(self, flow: CosyVoice3Flow) -> FlowCache:
        """A fresh cached stream for this voice: a copy of its prompt's reply-independent chunks."""
        if self.prompt is None:
            return FlowCache(flow.config.num_steps, flow.config.num_layers)
        if self._prompt_cache is None:
            with torch.inference_mode():
                self._prompt_cache = flow.prompt_cache(self.prompt, self.speaker)
        return self._prompt_cache.copy()


def default_speaker_embedding() -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(DEFAULT_SPEAKER_ASSET))["embedding"].float().reshape(1, -1)


@auto_docstring(
    custom_intro="Loading, saving and weight initialisation of the CosyVoice 3 token-to-waveform model (transformers' own)."
)
class CosyVoice3PreTrainedModel(PreTrainedModel):
    config_class = CosyVoice3Config
    config: CosyVoice3Config
    # trf-ignore: TRF002 (the official flow/hift keys carry no prefix and the model has no single base model to strip)
    base_model_prefix = ""
    main_input_name = "codes"
    # Each stage keeps its per-call state on one device: a device_map may place the two stages apart, not split one.
    _no_split_modules = ["CosyVoice3Flow", "HiFTGenerator"]
    # The vocoder, the DiT's rotary frequencies and the speaker embedding stay float32 whatever ``dtype`` the flow
    # is loaded in: the official runtime keeps the vocoder in fp32, and bf16 rotary frequencies shift the phases.
    _keep_in_fp32_modules_strict = ["hift", "rotary_inv_freq", "speaker_embedding"]

    @torch.no_grad()
    def _init_weights(self, module):  # trf-ignore: TRF018 (the official constructors use PyTorch's defaults)
        """PyTorch's default initialisation (what the official constructors use) for weights missing from a
        checkpoint or of a new model; the derived buffers (STFT window, rotary frequencies, default speaker)."""
        if isinstance(module, CosyVoice3Detokenizer):
            init.copy_(module.speaker_embedding, default_speaker_embedding().to(module.speaker_embedding.device))
        elif isinstance(module, HiFTGenerator):
            window = torch.hann_window(module.config.n_fft, periodic=True, dtype=torch.float64).float()
            init.copy_(module.stft_window, window.to(module.stft_window.device))
        elif isinstance(module, DiffusionTransformer):
            config = module.config
            inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
            init.copy_(module.rotary_inv_freq, inv_freq.to(module.rotary_inv_freq.device))
        elif isinstance(module, Snake):
            init.ones_(module.alpha)
        elif isinstance(module, (nn.Linear, nn.Conv1d)) and parametrize.is_parametrized(module, "weight"):
            # weight norm: a fresh direction with the default conv init, its norm as the magnitude
            direction = module.parametrizations.weight.original1
            fresh = torch.empty_like(direction)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            init.copy_(direction, fresh)
            init.copy_(
                module.parametrizations.weight.original0, fresh.norm(dim=tuple(range(1, fresh.dim())), keepdim=True)
            )
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()


class CosyVoice3Detokenizer(CosyVoice3PreTrainedModel):
    """The CosyVoice 3 token-to-waveform model (flow matching + HiFT vocoder) as a transformers ``PreTrainedModel``.

    Call it on one code sequence (1-D LongTensor or list of ints) for a 1-D float32 waveform at
    :attr:`sample_rate` (24 kHz), or on a list of sequences for a list of waveforms (batched).
    ``from_pretrained``/``save_pretrained``/``push_to_hub``/``dtype``/``device_map`` are transformers' own;
    ``from_pretrained`` also reads an official CosyVoice 3 folder directly (see :meth:`from_pretrained`).
    """

    def __init__(self, config: CosyVoice3Config):
        super().__init__(config)
        self.flow = CosyVoice3Flow(config.flow)
        self.hift = HiFTGenerator(config.hift)
        self.speaker_embedding = nn.Buffer(torch.zeros(1, config.flow.speaker_embedding_dim))
        self._noise_ready = False
        # each voice's tensors on this model's device and its prompt cache, built on first use (weak: a voice
        # that is dropped takes its cache with it)
        self._voice_conditioning: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.post_init()

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.hift.sample_rate

    @property
    def sampling_rate(self) -> int:  # the name the SpeechDetokenizer protocol uses
        return self.sample_rate

    @property
    def samples_per_token(self) -> int:
        return self.config.flow.token_mel_ratio * self.config.hift.samples_per_frame

    def ensure_noise(self):
        """Build the fixed noise tables (cheap; done once, lazily, so meta-device models never need them)."""
        if not self._noise_ready:
            initial_noise, state = fixed_noise(self.config)
            device = self.speaker_embedding.device
            self.flow.initial_noise = initial_noise.to(device)
            self.hift.source_noise_state = state
            self.hift.source_noise = self.hift.source_noise[:, :0]
            self._noise_ready = True

    # -- input checks -----------------------------------------------------------------------------------------
    def _as_codes(self, codes: Any) -> list[int]:
        if isinstance(codes, torch.Tensor):
            if codes.dim() != 1:
                raise ValueError(
                    f"codes must be 1-D (got shape {tuple(codes.shape)}); pass a list of 1-D sequences for a batch."
                )
            if codes.is_floating_point():
                raise ValueError("codes must be integers (a LongTensor or a list of ints), not floats.")
            codes = codes.tolist()
        out = [int(c) for c in codes]
        vocab = self.config.flow.vocab_size
        bad = [c for c in out if not 0 <= c < vocab]
        if bad:
            raise ValueError(
                f"speech codes must be in [0, {vocab}); got {bad[:5]}. Strip BOS/EOS/pad ids first "
                "(processor.decode_speech or speech_ids_to_codes does)."
            )
        return out

    def _speaker(self, speaker_embedding, batch: int = 1) -> torch.Tensor:
        weight = self.flow.token_embedding.weight
        if speaker_embedding is None:
            speaker = self.speaker_embedding
        else:
            speaker = torch.as_tensor(speaker_embedding, dtype=torch.float32)
            if speaker.numel() != self.config.flow.speaker_embedding_dim:
                raise ValueError(
                    f"speaker_embedding must have {self.config.flow.speaker_embedding_dim} values "
                    f"(a (1, {self.config.flow.speaker_embedding_dim}) CAM++ embedding); got shape "
                    f"{tuple(speaker.shape)}."
                )
            speaker = speaker.reshape(1, -1)
        return speaker.to(device=weight.device, dtype=torch.float32).expand(batch, -1)

    def _conditioning(self, speaker_embedding=None, voice: CosyVoice3Voice | None = None) -> VoiceConditioning:
        """What the flow is conditioned on: a voice (its embedding and prompt), a bare speaker embedding, or the
        default speaker."""
        if voice is None:
            return VoiceConditioning(self._speaker(speaker_embedding, 1), None)
        if speaker_embedding is not None:
            raise ValueError(
                "pass either voice= or speaker_embedding=, not both (a voice carries its own speaker embedding; "
                "CosyVoice3Voice.from_speaker_embedding makes a voice from a bare embedding)."
            )
        if not isinstance(voice, CosyVoice3Voice):
            raise TypeError(
                f"voice must be a CosyVoice3Voice (e.g. CosyVoice3Voice.load(path)); got {type(voice).__name__}."
            )
        weight = self.flow.token_embedding.weight
        key = (weight.device, weight.dtype)
        known = self._voice_conditioning.get(voice)
        if known is not None and known[0] == key:
            return known[1]
        voice.validate(self.config)
        speaker = voice.speaker_embedding.reshape(1, -1).to(device=weight.device, dtype=torch.float32)
        prompt = None
        if voice.has_prompt:
            mel = voice.prompt_mel.t()[None].to(device=weight.device, dtype=torch.float32)
            prompt = FlowPrompt(tuple(voice.prompt_codes.tolist()), mel)
        conditioning = VoiceConditioning(speaker, prompt, voice)
        self._voice_conditioning[voice] = (key, conditioning)
        return conditioning

    def prepare_voice(self, voice: CosyVoice3Voice) -> None:
        """Check ``voice`` against this detokenizer and encode its prompt's reply-independent chunks now (what its
        first ``chunked=True`` session would otherwise do), e.g. when a server registers its voices at start-up.
        Raises ``ValueError`` naming the problem for a voice that does not fit."""
        self.ensure_noise()
        self._conditioning(voice=voice).chunked_cache(self.flow)

    # -- offline ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    @auto_docstring(
        custom_intro="One sequence of 25 Hz speech codes to a 1-D 24 kHz waveform; a list of sequences (or a 2-D "
        "tensor) to a list of waveforms, rendered as one batch (each equal to its solo result)."
    )
    def forward(self, codes, speaker_embedding=None, voice: CosyVoice3Voice | None = None):
        r"""
        codes (`torch.LongTensor` or `list[int]` or `list[list[int]]`):
            Speech codes below `config.flow.vocab_size` (a real model's speech BOS/EOS/pad ids are refused).
        speaker_embedding (`torch.Tensor` of 192 values, *optional*):
            A bare CAM++ speaker embedding for every sequence.
        voice (`CosyVoice3Voice`, *optional*):
            A voice (embedding + prompt codes + prompt mel) every sequence is spoken in, prompt included. Neither
            this nor `speaker_embedding`: the default speaker.
        """
        if isinstance(codes, torch.Tensor):
            single = codes.dim() == 1
        else:
            single = all(not hasattr(c, "__len__") for c in codes)  # ints (or 0-d arrays), not sequences
        if isinstance(codes, torch.Tensor) and codes.dim() == 2:
            rows = [self._as_codes(row) for row in codes]
        elif single:
            rows = [self._as_codes(codes)]
        else:
            rows = [self._as_codes(row) for row in codes]
        if voice is not None and speaker_embedding is not None:
            self._conditioning(speaker_embedding, voice)  # raises: the two are exclusive
        waves = self.render_rows(rows, speaker_embedding, voices=None if voice is None else [voice] * len(rows))
        return waves[0] if single else waves

    @torch.inference_mode()
    def render_rows(
        self,
        rows: Sequence[list[int]],
        speaker_embedding=None,
        voices: Sequence[CosyVoice3Voice | None] | None = None,
    ) -> list[torch.Tensor]:
        """Offline waveforms of many code rows in one flow batch: ``voices`` gives one voice per row (None = the
        ``speaker_embedding``, or the default speaker). Every row's segments carry its voice's prompt and equal
        the row rendered alone."""
        self.ensure_noise()
        if voices is None:
            voices = [None] * len(rows)
        elif len(voices) != len(rows):
            raise ValueError(f"voices must give one voice (or None) per row: {len(voices)} voices, {len(rows)} rows.")
        default = self._conditioning(speaker_embedding) if any(voice is None for voice in voices) else None
        conditionings = [default if voice is None else self._conditioning(voice=voice) for voice in voices]
        pieces = []  # (row, segment tokens)
        for index, row in enumerate(rows):
            for start, end in split_segments(len(row), self.config.segment_tokens, self.config.min_last_segment_tokens):
                pieces.append((index, row[start:end]))
        mels = []
        if pieces:
            speakers = torch.cat([conditionings[index].speaker for index, _ in pieces])
            mels = self.flow.forward_rows(
                [tokens for _, tokens in pieces],
                speakers,
                [True] * len(pieces),
                [conditionings[index].prompt for index, _ in pieces],
            )
        speech = self._vocode_grouped(mels)
        out = [[] for _ in rows]
        for (index, _), wave in zip(pieces, speech):
            out[index].append(wave)
        dtype = torch.float32
        return [torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype) for parts in out]

    def _vocode_grouped(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The vocoder on each mel, batching mels of equal length (its right edge must not see padding)."""
        results: list[torch.Tensor | None] = [None] * len(mels)
        by_length: dict[int, list[int]] = {}
        for i, mel in enumerate(mels):
            by_length.setdefault(mel.shape[2], []).append(i)
        for length, members in by_length.items():
            if length == 0:
                for i in members:
                    results[i] = torch.zeros(0, device=mels[i].device)
                continue
            speech, _ = self.hift(torch.cat([mels[i] for i in members]).float(), finalize=True)
            for row, i in enumerate(members):
                results[i] = speech[row].float().cpu()
        return [r.cpu() for r in results]

    # -- streaming --------------------------------------------------------------------------------------------
    def streaming_session(
        self,
        speaker_embedding=None,
        chunked: bool = False,
        use_cache: bool = True,
        hop_tokens: int | None = None,
        voice: CosyVoice3Voice | None = None,
        hop_growth: int = 1,
        max_hop_tokens: int | None = None,
    ):
        """A stateful stream for one utterance, spoken in ``voice`` (or with ``speaker_embedding``, or the
        default speaker); see :class:`StreamingSession`."""
        self.ensure_noise()
        return StreamingSession(
            self,
            speaker_embedding,
            chunked=chunked,
            use_cache=use_cache,
            hop_tokens=hop_tokens,
            voice=voice,
            hop_growth=hop_growth,
            max_hop_tokens=max_hop_tokens,
        )

    # -- many streams at once ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def push_streams(
        self, pushes: Sequence[tuple[StreamingSession, Any, bool]], max_rounds: int | None = None
    ) -> list[torch.Tensor]:
        """Advance many streaming sessions together: ``pushes`` holds ``(session, new codes, finish)`` entries
        (one per session); returns each session's new audio, equal (within float rounding) to
        ``session.push(codes)`` followed, when ``finish`` is true, by ``session.finish()`` run alone.

        The due calls of all sessions run as one batched flow call and one vocoder call per group of equal
        window length, per round: the flow, by far the larger cost, runs once for every session instead of once
        per session. ``chunked=True`` sessions share a batched flow call of their own (each continues its own
        attention cache; a round with both kinds makes two flow calls). ``use_cache=False`` sessions (the
        official recompute-everything reference) run alone. A server synthesising many replies calls this once
        per tick.

        ``max_rounds`` bounds the rounds of this call (one round = at most one call per session): codes and
        finish requests beyond it stay with the sessions (:attr:`StreamingSession.has_due_calls`) for the next
        call, so a server can interleave many replies fairly, e.g. let a new reply's first audio through before
        the backlog of the others."""
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1 (or None for all due calls), got {max_rounds}.")
        sessions = [session for session, _, _ in pushes]
        if len({id(session) for session in sessions}) != len(sessions):
            raise ValueError("each session may appear once in push_streams; join its codes into one entry.")
        for session, codes, _ in pushes:
            if session.model is not self:
                raise ValueError("a session of another detokenizer was passed to push_streams.")
            session._accept(codes)
        for session, _, finish in pushes:
            session.finish_requested = session.finish_requested or bool(finish)
        pieces: list[list[torch.Tensor]] = [[] for _ in pushes]
        batched = []
        for index, (session, _, finish) in enumerate(pushes):
            if session.batchable:
                batched.append(index)
            else:
                pieces[index].append(session.push(()))
                if finish:
                    pieces[index].append(session.finish())
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            rounds += 1
            calls = []  # (entry index, step arguments)
            for index in batched:
                session = pushes[index][0]
                if session.finished:
                    continue
                call = session._next_call()
                if call is None and session.finish_requested:
                    call = session._final_call()
                    if call is None:
                        session.finished = True
                if call is not None:
                    calls.append((index, call))
            if not calls:
                break
            for (index, call), audio in zip(calls, self._run_stream_calls([(pushes[i][0], c) for i, c in calls])):
                pieces[index].append(audio)
                session = pushes[index][0]
                if call[2]:  # the finalizing call closes the session
                    session.finished = True
                else:
                    session._advance()
        return [torch.cat(parts) if parts else torch.zeros(0) for parts in pieces]

    def _run_stream_calls(self, calls: list[tuple[StreamingSession, tuple]]) -> list[torch.Tensor]:
        """One ``step`` of each session: their flow rows in one batch, their vocoder windows batched by length."""
        ratio, lookahead = self.config.flow.token_mel_ratio, self.config.flow.pre_lookahead_tokens
        flow_calls = [
            (session, tokens, offset, finalize)
            for session, (tokens, offset, finalize) in calls
            if finalize or len(tokens) - lookahead > offset
        ]
        # full-attention sessions recompute their token window in one padded batch; chunk-causal ones continue
        # their own caches in another (their keys differ in length per session)
        full = [call for call in flow_calls if not call[0].chunked]
        cached = [call for call in flow_calls if call[0].chunked]
        if full:
            speakers = torch.cat([session.speaker for session, *_ in full])
            mels = self.flow.forward_rows(
                [list(tokens) for _, tokens, _, _ in full],
                speakers,
                [final for *_, final in full],
                [session.conditioning.prompt for session, *_ in full],
            )
            for (session, _, offset, _), mel in zip(full, mels):
                session._add_mel(mel[:, :, ratio * offset :])
        if cached:
            mels = self.flow.forward_cached_rows(
                [
                    (list(tokens), session.speaker, final, session.flow_cache, session.conditioning.prompt)
                    for session, tokens, _, final in cached
                ]
            )
            for (session, _, offset, _), mel in zip(cached, mels):
                session._add_mel(mel[:, :, ratio * offset :])
        windows = [session._vocoder_window(finalize) for session, (_, _, finalize) in calls]
        groups: dict[tuple[int, bool], list[int]] = {}
        for position, ((session, (_, _, finalize)), window) in enumerate(zip(calls, windows)):
            if window is not None:
                length = session.mel_history.shape[2] - window[0]
                groups.setdefault((length, finalize), []).append(position)
        audio = [torch.zeros(0) for _ in calls]
        phase_width = self.config.hift.num_harmonics + 1
        for (_, finalize), members in groups.items():
            mel = torch.cat([calls[p][0].mel_history[:, :, windows[p][0] :] for p in members])
            phases = [windows[p][2] for p in members]
            phase_start = None
            if any(phase is not None for phase in phases):
                zero = torch.zeros(1, phase_width, dtype=torch.float64, device=mel.device)
                phase_start = torch.cat([zero if phase is None else phase for phase in phases])
            speech, f0 = self.hift(
                mel,
                finalize=finalize,
                frame_offset=[windows[p][0] for p in members],
                f0_override=[windows[p][1] for p in members],
                phase_start=phase_start,
            )
            for row, p in enumerate(members):
                audio[p] = calls[p][0]._take_vocoded(windows[p], speech[row], f0[row : row + 1])
        return audio

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, speaker_embedding=None, **kwargs):
        """transformers' ``from_pretrained`` for a converted folder or Hub repo (``config.json`` +
        ``model.safetensors``), plus two conveniences:

        * an **official CosyVoice 3 folder** or Hub repo (``cosyvoice3.yaml`` + ``flow.pt`` + ``hift.pt``) is
          converted in memory: the yaml is read as data (nothing in it is executed or evaluated as code, see
          :mod:`.loading`), the ``.pt`` files with ``torch.load(weights_only=True)``; ``fun-audio-chat
          convert-detokenizer`` writes the converted folder once instead;
        * ``speaker_embedding=`` (192 values) replaces the default speaker.

        Every checkpoint key must match the config: a missing or unexpected key raises
        :class:`CheckpointFormatError` instead of leaving random weights. The flow loads in ``dtype`` (float32 by
        default); the vocoder always stays float32.
        """
        hub_kwargs = {name: kwargs[name] for name in _HUB_KWARGS if kwargs.get(name) is not None}
        kind, folder = resolve_checkpoint(pretrained_model_name_or_path, **hub_kwargs)
        if kind == "official":
            model = cls._from_official_folder(folder, dtype=kwargs.get("dtype"), device_map=kwargs.get("device_map"))
        else:
            model_kwargs = {name: value for name, value in kwargs.items() if name not in _HUB_KWARGS}
            wants_info = bool(model_kwargs.pop("output_loading_info", False))
            model, info = super().from_pretrained(folder, *args, output_loading_info=True, **model_kwargs)
            _refuse_incomplete_checkpoint(folder, info)
            if (folder / SPEAKER_FILE).is_file():  # folders converted before the speaker lived in the weights
                from safetensors.torch import load_file

                model.set_speaker_embedding(load_file(str(folder / SPEAKER_FILE))["embedding"])
            if wants_info:
                if speaker_embedding is not None:
                    model.set_speaker_embedding(speaker_embedding)
                return model, info
        if speaker_embedding is not None:
            model.set_speaker_embedding(speaker_embedding)
        return model

    @classmethod
    def _from_official_folder(cls, folder: Path, dtype=None, device_map=None) -> CosyVoice3Detokenizer:
        config = config_from_official_yaml(_find_official_yaml(folder).read_text())
        state = official_state_dict(
            load_official_weights(folder / "flow.pt"), load_official_weights(folder / "hift.pt")
        )
        state["speaker_embedding"] = default_speaker_embedding()
        expected = {name: tuple(value.shape) for name, value in _meta_state_shapes(cls, config).items()}
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise CheckpointFormatError(
                f"checkpoint does not match the config: missing {_few(missing)}, unexpected {_few(unexpected)}."
            )
        for key, value in state.items():
            if tuple(value.shape) != expected[key]:
                raise CheckpointFormatError(
                    f"{key}: checkpoint shape {tuple(value.shape)} != model shape {expected[key]} "
                    "(config and weights disagree)."
                )
        # transformers loads from a folder: write the converted files to a temporary one and load that, so the
        # official folder gets exactly the dtype/device_map handling of a converted one
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="cosyvoice3-") as scratch:
            config.save_pretrained(scratch)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(scratch, CONVERTED_WEIGHTS))
            kwargs = {"dtype": dtype} if dtype is not None else {}
            if device_map is not None:
                kwargs["device_map"] = device_map
            model, info = super().from_pretrained(scratch, output_loading_info=True, **kwargs)
            _refuse_incomplete_checkpoint(folder, info)
        model.config.name_or_path = str(folder)
        return model

    def set_speaker_embedding(self, speaker_embedding) -> None:  # trf-ignore: TRF033 (a saved buffer, not a setting)
        """Replace the default speaker (a (1, 192) CAM++ embedding, or 192 values)."""
        value = torch.as_tensor(speaker_embedding, dtype=torch.float32)
        if value.numel() != self.config.flow.speaker_embedding_dim:
            raise ValueError(
                f"speaker_embedding must have {self.config.flow.speaker_embedding_dim} values; got shape "
                f"{tuple(value.shape)}."
            )
        with torch.no_grad():
            self.speaker_embedding.copy_(value.reshape(1, -1).to(self.speaker_embedding.device))


# Keyword arguments of from_pretrained that locate files (used for official Hub repos too); the rest go to transformers.
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def _few(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:6]}{'...' if len(keys) > 6 else ''}"


def _meta_state_shapes(cls, config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return cls(config).state_dict()


def _refuse_incomplete_checkpoint(folder, info: dict) -> None:
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        raise CheckpointFormatError(
            f"{folder}: the weights do not match config.json: missing {_few(missing)}, unexpected {_few(unexpected)}"
            f", wrong shape {_few(str(m) for m in mismatched)}."
        )


class StreamingSession:
    """One utterance rendered piece by piece.

    * :meth:`step` is the official per-call token-to-wave: the flow runs over the codes given (all of them, from
      the start of the current token window), the first ``2·token_offset`` mel frames are dropped, the new mel is
      appended to the vocoder history and the samples not returned before come back.
    * :meth:`push` / :meth:`finish` follow the official web-demo schedule on top of :meth:`step` (a call as soon as
      ``hop + 3`` codes past the offset exist, the token window trimmed every 200 codes, the vocoder history
      restarted after 500 trimmed codes) and :meth:`finish` also renders the tail the official sender drops.
      With ``chunked=True`` the flow is chunk-causal and the hop defaults to one attention chunk (25 codes);
      ``hop_tokens`` changes it (e.g. 15 for a first chunk after 18 codes: a partial chunk is recomputed
      by the next call, as the official chunked calls would).
    * ``hop_growth`` (1: the official fixed hop) multiplies the hop after every call, up to ``max_hop_tokens``
      (default: half the token window, 100 codes): the first audio comes as early as with the fixed hop, and
      the later calls, made while the listener still has audio queued, each cover more codes. With the official
      recompute-everything flow that cuts the work of a reply from quadratic to about linear in its length (a
      server synthesising many replies at once fits several times more); the audio differs from the fixed-hop
      stream where the official one does between schedules (frames first rendered with more right context).
    * ``use_cache=False`` recomputes everything each call exactly as the official code does (for comparisons).
    * ``voice``: every call runs the flow over the voice's prompt + the codes, as CosyVoice 3's own streaming
      does. A chunked session's first hop is lengthened so that prompt + first hop ends on a chunk boundary (the
      official ``prompt_token_pad``): every call then ends on one, and the chunked stream equals the chunk-causal
      flow over the whole reply. The prompt's reply-independent chunks come from the voice's cache (encoded once
      per voice, not per reply).
    """

    def __init__(
        self,
        model: CosyVoice3Detokenizer,
        speaker_embedding=None,
        chunked: bool = False,
        use_cache: bool = True,
        hop_tokens: int | None = None,
        voice: CosyVoice3Voice | None = None,
        hop_growth: int = 1,
        max_hop_tokens: int | None = None,
    ):
        self.model = model
        self.config = model.config
        self.conditioning = model._conditioning(speaker_embedding, voice)
        self.voice = voice
        self.speaker = self.conditioning.speaker
        self.chunked = chunked
        self.use_cache = use_cache
        flow = self.config.flow
        default_hop = flow.chunk_frames // flow.token_mel_ratio if chunked else self.config.stream_hop_tokens
        self.hop = hop_tokens or default_hop
        if self.hop <= 0:
            raise ValueError(f"hop_tokens must be positive, got {hop_tokens}.")
        if not isinstance(hop_growth, int) or hop_growth < 1:
            raise ValueError(
                f"hop_growth must be a whole number >= 1 (1 = the official fixed hop), got {hop_growth!r}; a whole "
                "factor keeps a chunked session's calls on chunk boundaries."
            )
        self.hop_growth = hop_growth
        # a hop beyond half the token window would let one call step over a window trim
        self.max_hop = max_hop_tokens or max(self.hop, self.config.max_stream_tokens // 2)
        if not self.hop <= self.max_hop <= self.config.max_stream_tokens // 2 and max_hop_tokens is not None:
            raise ValueError(
                f"max_hop_tokens must lie between the first hop ({self.hop}) and half the token window "
                f"({self.config.max_stream_tokens // 2}), got {max_hop_tokens}."
            )
        chunk_tokens = flow.chunk_frames // flow.token_mel_ratio
        # the official chunked streaming pads the first hop so prompt + first hop fills whole chunks
        self.first_hop_pad = (-self.conditioning.prompt_tokens) % chunk_tokens if chunked else 0
        self.tokens: list[int] = []
        self.offset = 0
        self.trimmed_tokens = 0
        self.finish_requested = False  # push_streams was asked to finish this session (possibly in a later round)
        self.flow_cache = self._fresh_flow_cache()
        self._reset_vocoder()

    def _fresh_flow_cache(self) -> FlowCache:
        if self.chunked and self.use_cache:
            return self.conditioning.chunked_cache(self.model.flow)
        return FlowCache(self.config.flow.num_steps, self.config.flow.num_layers)

    @property
    def _hop_now(self) -> int:
        """Tokens the next call advances by: the first call of a chunked voice session also takes the pad."""
        return self.hop + (self.first_hop_pad if self.offset == 0 and self.trimmed_tokens == 0 else 0)

    def _reset_vocoder(self):
        self.mel_history = None  # (1, mel, frames)
        self.speech_offset = 0  # samples returned so far
        self.final_f0 = None  # (1, k) F0 of frames that no later call can change
        self.final_phase = None  # (1, k, H+1) float64 running phase (cycles) after each of those frames
        self.finished = False

    # -- the official per-call token-to-wave -----------------------------------------------------------------
    @torch.inference_mode()
    def step(self, codes, token_offset: int = 0, finalize: bool = False, chunked: bool | None = None) -> torch.Tensor:
        """Flow over ``codes`` (the whole current window), mel frames from ``2·token_offset`` appended to the
        vocoder history; returns the new samples (1-D float32, possibly empty)."""
        chunked = self.chunked if chunked is None else chunked
        tokens = self.model._as_codes(codes)
        if token_offset < 0 or token_offset > len(tokens):
            raise ValueError(f"token_offset={token_offset} must be within the {len(tokens)} codes given.")
        ratio, lookahead = self.config.flow.token_mel_ratio, self.config.flow.pre_lookahead_tokens
        if not finalize and len(tokens) - lookahead <= token_offset:
            new_mel = None
        elif chunked and self.use_cache:
            prompt = self.conditioning.prompt
            new_mel = self.model.flow.forward_cached(tokens, self.speaker, finalize, self.flow_cache, prompt)
            new_mel = new_mel[:, :, ratio * token_offset :]
        else:
            device = self.speaker.device
            batch = torch.tensor([tokens], dtype=torch.long, device=device)
            prompt = self.conditioning.prompt
            prompt_tokens = None if prompt is None else torch.tensor([prompt.tokens], dtype=torch.long, device=device)
            mel = self.model.flow(
                batch,
                self.speaker,
                finalize=finalize,
                chunked=chunked,
                prompt_tokens=prompt_tokens,
                prompt_mel=None if prompt is None else prompt.mel,
            )
            new_mel = mel[:, :, ratio * token_offset :]
        self._add_mel(new_mel)
        return self._vocode(finalize)

    def _vocode(self, finalize: bool) -> torch.Tensor:
        window = self._vocoder_window(finalize)
        if window is None:
            return torch.zeros(0)
        if not self.use_cache:
            speech, _ = self.model.hift(self.mel_history, finalize=finalize)
            new = speech[0, self.speech_offset :]
            self.speech_offset += new.shape[0]
            return new.float().cpu()
        start, override, phase_start = window
        speech, f0 = self.model.hift(
            self.mel_history[:, :, start:],
            finalize=finalize,
            frame_offset=start,
            f0_override=override,
            phase_start=phase_start,
        )
        return self._take_vocoded(window, speech[0], f0)

    def _vocoder_window(self, finalize: bool):
        """What the vocoder renders next: None when no new samples are due, else (first mel frame of the window,
        the settled F0 to reuse from there or None, the source phase before that frame or None)."""
        if self.mel_history is None:
            return None
        per_frame = self.config.hift.samples_per_frame
        config = self.config.hift
        held_back = 0 if finalize else config.f0_lookahead + config.conv_pre_lookahead + 1
        if self.mel_history.shape[2] - held_back <= self.speech_offset // per_frame:
            return None
        emitted_frames = self.speech_offset // per_frame
        start = max(0, emitted_frames - VOCODER_CONTEXT_FRAMES) if self.use_cache else 0
        known = 0 if self.final_f0 is None else self.final_f0.shape[1]
        phase_start = self.final_phase[:, start - 1] if start else None
        override = self.final_f0[:, start:known] if known > start else None
        return start, override, phase_start

    def _take_vocoded(self, window, speech: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """Keep the new samples of a windowed vocoder call (speech (samples,), f0 (1, frames)) and the F0 that no
        later call can change, so later windows continue the source phase exactly."""
        start = window[0]
        per_frame = self.config.hift.samples_per_frame
        emitted_frames = self.speech_offset // per_frame
        new = speech[(emitted_frames - start) * per_frame :]
        # F0 of frames with their look-ahead (all returned frames) and their full left context (far enough from
        # the window start) is final: keep it to continue the source phase exactly in later calls
        known = 0 if self.final_f0 is None else self.final_f0.shape[1]
        settled = start + f0.shape[1]
        reliable_from = known if start == 0 else max(known, start + VOCODER_CONTEXT_FRAMES // 2)
        if settled > reliable_from == known:
            piece = f0[:, reliable_from - start : settled - start]
            increments = self.model.hift.source.frame_increments(piece).double()
            if self.final_phase is not None:
                increments = torch.cat([self.final_phase[:, -1:], increments], dim=1)
            running = torch.cumsum(increments, dim=1)[:, (0 if self.final_phase is None else 1) :]
            self.final_f0 = piece if self.final_f0 is None else torch.cat([self.final_f0, piece], dim=1)
            self.final_phase = running if self.final_phase is None else torch.cat([self.final_phase, running], 1)
        self.speech_offset += new.shape[0]
        return new.float().cpu()

    def _add_mel(self, new_mel: torch.Tensor | None) -> None:
        if new_mel is not None and new_mel.shape[2]:
            new_mel = new_mel.float()
            self.mel_history = new_mel if self.mel_history is None else torch.cat([self.mel_history, new_mel], 2)

    @property
    def has_due_calls(self) -> bool:
        """Codes received (or a finish requested through ``push_streams``) that no call has rendered yet."""
        if self.finished:
            return False
        return self._next_call() is not None or self.finish_requested

    @property
    def batchable(self) -> bool:
        """Whether :func:`push_streams` can run this session's calls in a batch with other sessions: every
        session with the windowed vocoder (``use_cache=True``); full-attention and chunk-causal sessions share
        separate flow batches."""
        return self.use_cache

    # -- the web-demo schedule ---------------------------------------------------------------------------------
    def push(self, codes) -> torch.Tensor:
        """Add codes as they arrive; returns the audio that became ready (1-D, possibly empty)."""
        self._accept(codes)
        out = []
        while (call := self._next_call()) is not None:
            out.append(self.step(*call))
            self._advance()
        return torch.cat(out) if out else torch.zeros(0)

    def add_codes(self, codes) -> None:
        """Receive codes without rendering them (``push_streams`` renders them later, e.g. in a batch)."""
        self._accept(codes)

    def _accept(self, codes) -> None:
        if self.finished:
            raise RuntimeError("this streaming session is finished; start a new one with det.streaming_session().")
        self.tokens.extend(self.model._as_codes(codes))

    def _next_call(self):
        """The next official call due on the codes received, as ``step`` arguments, or None."""
        end = self.offset + self._hop_now + self.config.flow.pre_lookahead_tokens
        if len(self.tokens) >= end:
            return self.tokens[:end], self.offset, False
        return None

    def _final_call(self):
        """The closing call of :meth:`finish` as ``step`` arguments, or None when nothing is left to render."""
        if len(self.tokens) > self.offset or self.mel_history is not None:
            return self.tokens, min(self.offset, len(self.tokens)), True
        return None

    def _advance(self):
        self.offset += self._hop_now
        self.hop = min(self.max_hop, self.hop * self.hop_growth)
        # CODEPATH: every CosyVoice 3 checkpoint: a long reply trims its token window, then restarts the vocoder
        if self.offset >= self.config.max_stream_tokens:
            window = self.config.max_stream_tokens
            self.offset -= window
            self.tokens = self.tokens[window:]
            self.trimmed_tokens += window
            self.flow_cache = self._fresh_flow_cache()
            # CODEPATH: every CosyVoice 3 checkpoint: the vocoder history restarts after enough trimmed tokens
            if self.trimmed_tokens >= self.config.max_stream_history_tokens:
                self.trimmed_tokens = 0
                self._reset_vocoder()

    def finish(self) -> torch.Tensor:
        """Render everything not yet returned (the official sender skips a last call of ≤ 4 new codes and
        never renders the vocoder's held-back frames; this does both) and close the session."""
        if self.finished:
            return torch.zeros(0)
        call = self._final_call()
        tail = self.step(*call) if call is not None else torch.zeros(0)
        self.finished = True
        return tail


def random_detokenizer(config: CosyVoice3Config | None = None, seed: int = 0) -> CosyVoice3Detokenizer:
    """A detokenizer with random weights (deterministic for ``seed``), the default speaker and an F0 head set to
    about 100 Hz so the excitation is voiced: for demos, tests and benchmarks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CosyVoice3Detokenizer(config or CosyVoice3Config())
        with torch.no_grad():
            classifier = model.hift.f0_predictor.classifier
            classifier.weight.mul_(10.0)
            classifier.bias.fill_(100.0)
    return model.eval()
