"""Tokens (25 Hz) → 80-bin mel (50 Hz): token embedding, pre-look-ahead convolutions and a conditional flow
matching sampler (Euler, cosine time schedule, classifier-free guidance) around the DiT estimator.

The sampler always starts from the same fixed noise table, from frame 0 (or from the first new frame when
continuing a cached stream), which makes every call deterministic and lets streaming reuse earlier frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_cosyvoice3 import CosyVoice3FlowConfig
from .dit import DiffusionTransformer, DiTCache


class PreLookaheadConvs(nn.Module):
    """Each token's frame sees itself and ``lookahead`` future tokens (first conv), then two past positions
    (second conv), plus a residual of its own embedding. Not finalizing, the last ``lookahead`` tokens are
    right context only and produce no output."""

    def __init__(self, mel_bins: int, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.lookahead_conv = nn.Conv1d(mel_bins, channels, lookahead + 1)
        self.causal_conv = nn.Conv1d(channels, mel_bins, 3)

    def forward(self, embedded: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        h = embedded.transpose(1, 2)
        if finalize:
            h = F.pad(h, (0, self.lookahead))
        h = F.leaky_relu(self.lookahead_conv(h), 0.01)
        h = self.causal_conv(F.pad(h, (self.causal_conv.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2) + embedded[:, : h.shape[2]]


class FlowCache:
    """A cached chunk-causal stream: one :class:`DiTCache` per Euler step plus the committed mel frames."""

    def __init__(self, num_steps: int, num_layers: int):
        self.steps = [DiTCache(num_layers) for _ in range(num_steps)]
        self.tokens: list[int] = []  # the tokens whose frames are committed (with their look-ahead)
        self.mel = None  # (1, mel, committed frames)

    def copy(self) -> FlowCache:
        """An independent continuation of this cache (e.g. a voice's prompt, shared by many replies): appending
        to the copy never changes the original (caches only ever grow by concatenation, never in place)."""
        other = FlowCache(0, 0)
        other.steps = [step.copy() for step in self.steps]
        other.tokens = list(self.tokens)
        other.mel = self.mel
        return other

    @property
    def frames(self) -> int:
        return self.steps[0].length

    def memory_bytes(self) -> int:
        return sum(step.memory_bytes() for step in self.steps)


@dataclass(frozen=True)
class FlowPrompt:
    """A voice's prompt as the flow takes it: codes (list of ints) and their mel (1, mel, ratio·len(codes)) on the
    flow's device."""

    tokens: tuple[int, ...]
    mel: torch.Tensor


class CosyVoice3Flow(nn.Module):
    def __init__(self, config: CosyVoice3FlowConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.mel_bins)
        self.speaker_projection = nn.Linear(config.speaker_embedding_dim, config.mel_bins)
        self.pre_lookahead = PreLookaheadConvs(
            config.mel_bins, config.pre_lookahead_channels, config.pre_lookahead_tokens
        )
        self.estimator = DiffusionTransformer(config)
        self.register_buffer("initial_noise", torch.zeros(1, config.mel_bins, 0), persistent=False)

    # -- conditioning -----------------------------------------------------------------------------------------
    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.speaker_projection(F.normalize(embedding, dim=1))

    def encode_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor | None, finalize: bool) -> torch.Tensor:
        """(B, n) tokens → mu (B, mel, T) at the mel rate."""
        embedded = self.token_embedding(tokens.clamp(min=0))
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
            embedded = embedded * valid[..., None].to(embedded.dtype)
        h = self.pre_lookahead(embedded, finalize)
        return h.repeat_interleave(self.config.token_mel_ratio, dim=1).transpose(1, 2)

    def cfm_schedule(self, dtype=torch.float32, device=None) -> torch.Tensor:
        t = torch.linspace(0, 1, self.config.num_steps + 1, dtype=dtype, device=device)
        return 1 - torch.cos(t * 0.5 * torch.pi)

    def noise(self, start: int, length: int, batch: int, dtype) -> torch.Tensor:
        if start + length > self.initial_noise.shape[2]:
            raise ValueError(
                f"{start + length} mel frames exceed the flow's noise table of {self.initial_noise.shape[2]} frames "
                f"({self.initial_noise.shape[2] // 50} s): split the codes into shorter pieces."
            )
        return self.initial_noise[:, :, start : start + length].expand(batch, -1, -1).to(dtype)

    # -- sampling ---------------------------------------------------------------------------------------------
    def sample(self, mu, speaker, lengths=None, chunk_frames=None, trace: dict | None = None, cond=None):
        """Euler integration of the guided velocity from the fixed noise to a mel (B, mel, T); ``cond`` (B, mel, T)
        holds each row's prompt mel in its first frames (zeros elsewhere; None = no prompt)."""
        batch, _, length = mu.shape

        def velocity(step, x, guided_mu, t, guided_speaker, guided_cond):
            guided_lengths = None if lengths is None else torch.cat([lengths, lengths])
            return self.estimator(x, guided_mu, t, guided_speaker, guided_cond, guided_lengths, chunk_frames)

        return self._integrate(self.noise(0, length, batch, mu.dtype), mu, speaker, velocity, trace, cond)

    def _sample_cached(self, mu, speaker, caches: list[FlowCache], lengths: list[int], commits: list[int], cond=None):
        """Chunk-causal Euler integration of streams continuing their caches in one batch: mu (B, mel, T) holds
        each stream's new frames (``lengths``, right-padded); the first ``commits`` frames of each are cached."""
        x = torch.zeros_like(mu)
        for row, (cache, length) in enumerate(zip(caches, lengths)):
            x[row, :, :length] = self.noise(cache.frames, length, 1, mu.dtype)[0]
        chunk = self.config.chunk_frames

        def velocity(step, x, guided_mu, t, guided_speaker, guided_cond):
            step_caches = [cache.steps[step - 1] for cache in caches]
            return self.estimator(x, guided_mu, t, guided_speaker, guided_cond, lengths, chunk, step_caches, commits)

        return self._integrate(x, mu, speaker, velocity, None, cond)

    def _integrate(self, x, mu, speaker, velocity, trace: dict | None, cond=None):
        """The guided Euler loop from ``x``; ``velocity(step, x, mu, t, speaker, cond)`` runs the estimator on the
        guidance batch (conditioned rows, then unconditioned rows: no mu, speaker or prompt)."""
        batch = mu.shape[0]
        cond = torch.zeros_like(mu) if cond is None else cond.to(mu.dtype)
        guided_mu, guided_cond = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([cond, torch.zeros_like(cond)])
        guided_speaker = torch.cat([speaker, torch.zeros_like(speaker)])
        t_span = self.cfm_schedule(mu.dtype, mu.device)
        t, dt = t_span[0], t_span[1] - t_span[0]
        cfg = self.config.cfg_rate
        if trace is not None:
            trace.update(z0=x.clone(), mu=mu.clone(), cond=cond.clone(), t=[], x_in=[], v_cond=[], v_uncond=[])
        for step in range(1, self.config.num_steps + 1):
            if trace is not None:
                trace["t"].append(t.clone())
                trace["x_in"].append(x.clone())
            guided = velocity(step, torch.cat([x, x]), guided_mu, t.expand(2 * batch), guided_speaker, guided_cond)
            v_cond, v_uncond = guided[:batch], guided[batch:]
            if trace is not None:
                trace["v_cond"].append(v_cond.clone())
                trace["v_uncond"].append(v_uncond.clone())
            x = x + dt * ((1.0 + cfg) * v_cond - cfg * v_uncond)
            t = t + dt
            if step < self.config.num_steps:
                dt = t_span[step + 1] - t
        if trace is not None:
            trace["x_out"] = x.clone()
        return x

    def forward(
        self,
        tokens,
        speaker_embedding,
        lengths=None,
        finalize=True,
        chunked=False,
        trace: dict | None = None,
        prompt_tokens=None,
        prompt_mel=None,
    ):
        """Tokens (B, n) and speaker embeddings (B, 192) → mel (B, mel, T), T = ratio·n (finalize) or
        ratio·(n − look-ahead). ``lengths`` (B,) gives each row's token count in a padded batch (finalize only).

        A prompt (every row the same length, as the official ``inference``): ``prompt_tokens`` (B, P) and
        ``prompt_mel`` (B, mel, ratio·P). The flow runs over prompt + tokens with the prompt mel as the known
        start (``cond``); the prompt's frames are integrated too and dropped from the result."""
        if lengths is not None and not finalize:
            raise ValueError("padded batches need finalize=True (each row's look-ahead would read padding).")
        ratio = self.config.token_mel_ratio
        prompt_frames = 0
        if prompt_tokens is not None and prompt_tokens.shape[1]:
            prompt_frames = ratio * prompt_tokens.shape[1]
            if prompt_mel is None or tuple(prompt_mel.shape) != (tokens.shape[0], self.config.mel_bins, prompt_frames):
                raise ValueError(
                    f"{prompt_tokens.shape[1]} prompt tokens need a prompt mel of shape "
                    f"({tokens.shape[0]}, {self.config.mel_bins}, {prompt_frames}); got "
                    f"{None if prompt_mel is None else tuple(prompt_mel.shape)}."
                )
            tokens = torch.cat([prompt_tokens.to(tokens.dtype), tokens], dim=1)
            lengths = None if lengths is None else lengths + prompt_tokens.shape[1]
        mu = self.encode_tokens(tokens, lengths, finalize)
        speaker = self.speaker(speaker_embedding.to(mu.dtype))
        if trace is not None:
            trace["speaker"] = speaker.clone()
        cond = None
        if prompt_frames:
            cond = torch.zeros_like(mu)
            cond[:, :, :prompt_frames] = prompt_mel.to(mu.dtype)
        frame_lengths = None if lengths is None else lengths * ratio
        chunk = self.config.chunk_frames if chunked else None
        return self.sample(mu, speaker, frame_lengths, chunk, trace=trace, cond=cond)[:, :, prompt_frames:]

    def forward_rows(
        self,
        rows: list[list[int]],
        speaker_embeddings: torch.Tensor,
        finalize: list[bool],
        prompts: list[FlowPrompt | None] | None = None,
    ):
        """Full-attention flow over rows of different lengths in one padded batch, each row finalizing or not and
        each with its own prompt (or none): returns one mel (1, mel, T_i) per row (without its prompt frames),
        equal to ``forward`` on that row alone (within float rounding).

        Each row runs as prompt + codes from frame 0 of the noise; padding is zeros after a row, the same zeros a
        finalizing call adds as right context; a non-finalizing row keeps its last ``look-ahead`` codes as right
        context only (its frames end before them) and the attention of every row is masked to its own frames."""
        config = self.config
        ratio, lookahead = config.token_mel_ratio, config.pre_lookahead_tokens
        device = self.token_embedding.weight.device
        prompts = prompts or [None] * len(rows)
        prompt_lengths = [0 if prompt is None else len(prompt.tokens) for prompt in prompts]
        full_rows = [
            list(row) if prompt is None else list(prompt.tokens) + list(row) for row, prompt in zip(rows, prompts)
        ]
        token_lengths = torch.tensor([len(row) for row in full_rows], device=device)
        tokens = torch.zeros(len(rows), int(token_lengths.max()), dtype=torch.long, device=device)
        for index, row in enumerate(full_rows):
            tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        output_tokens = [len(row) if final else len(row) - lookahead for row, final in zip(rows, finalize)]
        if min(output_tokens) <= 0:
            raise ValueError("every row needs at least one output frame (a non-final row more codes than look-ahead).")
        mu = self.encode_tokens(tokens, token_lengths, finalize=True)
        speaker = self.speaker(speaker_embeddings.to(mu.dtype))
        cond = None
        if any(prompt_lengths):
            cond = torch.zeros_like(mu)
            for index, prompt in enumerate(prompts):
                if prompt is not None and prompt_lengths[index]:
                    cond[index, :, : prompt.mel.shape[2]] = prompt.mel[0].to(mu.dtype)
        frame_lengths = (
            torch.tensor(output_tokens, device=device) + torch.tensor(prompt_lengths, device=device)
        ) * ratio
        padded = None if int(frame_lengths.min()) == mu.shape[2] else frame_lengths
        mel = self.sample(mu, speaker, padded, cond=cond)
        return [
            mel[index : index + 1, :, skip * ratio : (skip + count) * ratio]
            for index, (skip, count) in enumerate(zip(prompt_lengths, output_tokens))
        ]

    def forward_cached(
        self, tokens: list[int], speaker_embedding, finalize: bool, cache: FlowCache, prompt: FlowPrompt | None = None
    ):
        """Chunk-causal flow of one row, reusing ``cache``: frames of complete chunks whose tokens (with their
        look-ahead) were seen before are not recomputed. Returns the whole mel (1, mel, T) like ``forward``.

        With a ``prompt`` the stream is prompt + tokens from its first frame (the chunks are counted from the
        prompt's start, as the official chunked calls do); its cache starts with the prompt's frames, which
        :meth:`prompt_cache` computes once per voice."""
        return self.forward_cached_rows([(tokens, speaker_embedding, finalize, cache, prompt)])[0]

    def prompt_cache(self, prompt: FlowPrompt, speaker_embedding) -> FlowCache:
        """A :class:`FlowCache` holding the chunk-causal frames of the prompt that no reply can change (the
        whole chunks before the prompt's last look-ahead codes, which read the reply's first codes). A stream
        that starts from a :meth:`FlowCache.copy` of it skips those frames: the voice's prompt is encoded once,
        not once per reply."""
        cache = FlowCache(self.config.num_steps, self.config.num_layers)
        if len(prompt.tokens) > self.config.pre_lookahead_tokens:
            self.forward_cached_rows([([], speaker_embedding, False, cache, prompt)])
        return cache

    def forward_cached_rows(self, rows: list[tuple]) -> list[torch.Tensor]:
        """:meth:`forward_cached` of many streams in one batch: rows of (tokens, speaker embedding (1, 192),
        finalize, the stream's own cache[, prompt or None]). The new frames of all rows run through one guided
        Euler integration (each row attends to its own cache and new frames only); returns each row's whole mel
        (1, mel, T) after its prompt."""
        config = self.config
        ratio, lookahead = config.token_mel_ratio, config.pre_lookahead_tokens
        device = self.token_embedding.weight.device
        results: list[torch.Tensor | None] = [None] * len(rows)
        prompts = [row[4] if len(row) > 4 else None for row in rows]
        prompt_frames = [0 if prompt is None else prompt.mel.shape[2] for prompt in prompts]
        pending = []  # (row index, tokens, new mu (1, mel, n), stable frames to commit, cache)
        for index, (reply_tokens, _, finalize, cache, *_) in enumerate(rows):
            prompt = prompts[index]
            tokens = list(reply_tokens) if prompt is None else list(prompt.tokens) + list(reply_tokens)
            committed_tokens = cache.frames // ratio
            reusable = committed_tokens + lookahead
            if cache.frames and (len(tokens) < reusable or tokens[:reusable] != cache.tokens[:reusable]):
                cache.__init__(config.num_steps, config.num_layers)  # the prefix changed: start over
                committed_tokens = 0
            n_out = len(tokens) if finalize else len(tokens) - lookahead
            if n_out <= committed_tokens:
                results[index] = cache.mel[:, :, : n_out * ratio] if cache.mel is not None else self._empty_mel()
                continue
            # the pre-look-ahead's causal conv reads two earlier token positions: recompute from a little before
            context = min(committed_tokens, 2)
            window = torch.tensor([tokens[committed_tokens - context :]], dtype=torch.long, device=device)
            mu = self.encode_tokens(window, None, finalize)[:, :, context * ratio :]
            total = cache.frames + mu.shape[2]
            # only whole chunks of a non-final call are stable (a final call never continues)
            stable = 0 if finalize else (total // config.chunk_frames) * config.chunk_frames - cache.frames
            pending.append((index, tokens, mu, max(stable, 0), cache))
        if pending:
            lengths = [mu.shape[2] for _, _, mu, _, _ in pending]
            mu = torch.cat([F.pad(mu, (0, max(lengths) - mu.shape[2])) for _, _, mu, _, _ in pending])
            speaker = self.speaker(torch.cat([rows[index][1] for index, *_ in pending]).to(mu.dtype))
            caches = [cache for *_, cache in pending]
            starts = [cache.frames for cache in caches]
            cond = None
            if any(prompt_frames[index] > start for (index, *_), start in zip(pending, starts)):
                # the prompt mel is the known start of each stream: the new frames that fall inside it get it
                cond = torch.zeros_like(mu)
                for row, ((index, *_), start, length) in enumerate(zip(pending, starts, lengths)):
                    end = min(prompt_frames[index], start + length)
                    if end > start:
                        cond[row, :, : end - start] = prompts[index].mel[0, :, start:end].to(mu.dtype)
            commits = [stable for *_, stable, _ in pending]
            mel_new = self._sample_cached(mu, speaker, caches, lengths, commits, cond)
            for row, ((index, tokens, _, stable, cache), start, length) in enumerate(zip(pending, starts, lengths)):
                new = mel_new[row : row + 1, :, :length]
                mel = new if cache.mel is None else torch.cat([cache.mel, new], dim=2)
                if stable:
                    cache.mel = mel[:, :, : start + stable]
                    cache.tokens = list(tokens[: (start + stable) // ratio + lookahead])
                results[index] = mel
        return [mel[:, :, skip:] for mel, skip in zip(results, prompt_frames)]

    def _empty_mel(self):
        weight = self.token_embedding.weight
        return torch.zeros(1, self.config.mel_bins, 0, dtype=weight.dtype, device=weight.device)
