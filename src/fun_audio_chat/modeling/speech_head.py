"""Speech Refined Head (``audio_invert_tower``): ungroups each 5 Hz LLM state into k 25 Hz speech codes.

``pre_matching`` lifts one LLM state to k sub-position states; a small Qwen3 decoder (``crq_transformer``)
runs autoregressively over the 25 Hz sub-positions, each input being the sub-position state plus the
embedding of the previous speech code. Its output head is tied to the speech embedding table.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig
from ..transformers_compat import CACHE_NAME


class FunAudioChatSpeechHead(nn.Module):
    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.group_size = config.group_size
        hidden = config.output_dim
        backbone_config = config.crq_transformer_config
        # The backbone is fed embeddings only: build it with a one-row vocabulary and drop the table, so the
        # 8B model never allocates the unused (151936, 1024) matrix. The backbone keeps the config object itself
        # (not a copy), so transformers finds it as the audio config's sub-config: set_attn_implementation (a
        # string, or a dict naming "crq_transformer_config") reaches the backbone's attention layers.
        vocab_size, backbone_config.vocab_size = backbone_config.vocab_size, 1
        try:
            self.crq_transformer = AutoModel.from_config(backbone_config)
        finally:
            backbone_config.vocab_size = vocab_size
        del self.crq_transformer.embed_tokens
        backbone_width = backbone_config.hidden_size
        self.pre_matching = nn.Linear(hidden, hidden * self.group_size, bias=True)
        self.input_matching = nn.Linear(hidden, backbone_width, bias=False)
        self.output_matching = nn.Linear(backbone_width, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, config.codebook_size, bias=False)

    def ungroup(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) LLM-rate states -> (B, L·k, H) sub-position states; sub-position (p, j) is row p·k + j."""
        batch, length, hidden = states.shape
        return self.pre_matching(states).view(batch, length * self.group_size, hidden)

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings of speech codes: rows of the tied output table (= the speech embedding table)."""
        return nn.functional.embedding(codes, self.lm_head.weight)

    def run_backbone(
        self,
        sub_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """Backbone over (B, T, H) inputs (sub-position state + previous-code embedding); returns the
        backbone output and the speech logits (B, T, codebook)."""
        output = self.crq_transformer(
            inputs_embeds=self.input_matching(sub_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: past_key_values},
        )
        logits = self.lm_head(self.output_matching(output.last_hidden_state))
        return output, logits

    def compiled_backbone(self, compile_config):
        """``torch.compile``'d ``crq_transformer`` call for static-cache sub-steps, built once per compile config
        (what ``PreTrainedModel.get_compiled_call`` does for generating models; the backbone is not one)."""
        if getattr(self, "_compiled_backbone_config", None) != compile_config:
            self._compiled_backbone = torch.compile(self.crq_transformer.__call__, **compile_config.to_dict())
            self._compiled_backbone_config = compile_config
        return self._compiled_backbone

    def decode_step(
        self,
        sub_state: torch.Tensor,
        cache,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new sub-position (B, 1, H) through the backbone's decoder layers with its KV cache; returns logits
        (B, 1, codebook).

        Generation runs this k times per LLM step. It calls transformers' own Qwen3 decoder layers and final norm
        (so attention implementations, adapters and offload hooks apply) but skips ``crq_transformer.forward``'s
        per-call mask and rotary construction: ``position_embeddings`` are this position's precomputed (cos, sin)
        and ``attention_mask`` an additive (B, 1, 1, T) key mask, or None when nothing is padded.
        """
        backbone = self.crq_transformer
        hidden = self.input_matching(sub_state)
        for layer in backbone.layers[: backbone.config.num_hidden_layers]:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=True,
                **{CACHE_NAME: cache},
            )
        return self.lm_head(self.output_matching(backbone.norm(hidden)))

    def forward(
        self,
        states: torch.Tensor,
        previous_code_embeddings: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over a whole sequence: states (B, L, H) -> speech logits (B, L·k, codebook).

        ``previous_code_embeddings`` (B, L·k, H) holds, at each sub-position, the embedding of the code that
        precedes its target in the 25 Hz stream.
        """
        sub_states = self.ungroup(states)
        if previous_code_embeddings is not None:
            sub_states = sub_states + previous_code_embeddings
        _, logits = self.run_backbone(sub_states, attention_mask=attention_mask, position_ids=position_ids)
        return logits
