"""Discrete speech encoder (``audio_tower``): DRSR grouping of k 25 Hz speech codes into one 5 Hz LLM input.

The technical report writes the grouping as a Linear over the concatenated k embeddings; the released
checkpoint uses the mean of the k embeddings followed by a Linear, which is what this module computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig


class FunAudioChatDiscreteEncoder(nn.Module):
    """Embeds 25 Hz speech codes, averages each group of k into one 5 Hz position and projects it (``audio_tower``).

    It has no attention, so every attention implementation suits it. transformers' composite-model dispatch still
    reads ``_supports_sdpa`` on each modality tower to decide what its (shared ``audio_config``) attention setting
    should be; without the flag an SDPA load would be marked as falling back to eager for the whole audio side.
    """

    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: FunAudioChatAudioEncoderConfig):
        super().__init__()
        self.config = config
        self.group_size = config.group_size
        hidden = config.output_dim
        self.embed_tokens = nn.Embedding(config.codebook_size, hidden, padding_idx=config.pad_token_id)
        self.output_matching = nn.Linear(hidden, hidden, bias=False)
        self.continual_output_matching = nn.Linear(hidden, hidden, bias=False)

    def group_mean(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, S, H) at 25 Hz with S a multiple of k -> (N, S/k, H) means."""
        rows, length, hidden = frames.shape
        return frames.view(rows, length // self.group_size, self.group_size, hidden).mean(dim=2)

    def forward(
        self,
        speech_ids: torch.Tensor,
        continuous_features: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Grouped embeddings (N, S/k, H) of speech ids (N, S).

        ``continuous_features`` (M, S, H) belong to the M rows where ``feature_exist_mask`` is True; in
        "replace" mode they stand in for those rows' codes, in "add" mode they are added.
        """
        grouped = self.output_matching(self.group_mean(self.embed_tokens(speech_ids)))
        if continuous_features is None:
            return grouped
        continuous = self.continual_output_matching(self.group_mean(continuous_features)).to(grouped.dtype)
        if feature_exist_mask is None:
            feature_exist_mask = torch.ones(grouped.shape[0], dtype=torch.bool, device=grouped.device)
        index = feature_exist_mask.nonzero(as_tuple=True)[0]
        if self.config.continuous_features_mode == "replace":
            return grouped.index_copy(0, index, continuous)
        return grouped.index_add(0, index, continuous)
