"""``FunAudioChatModelTester``: a tiny config and matching inputs, shared by the modeling and generation tests.

Shaped like transformers' model testers (``tests/models/csm/test_modeling_csm.py``): ``get_config``,
``prepare_config_and_inputs`` and ``prepare_config_and_inputs_for_common``, plus ``create_model`` for a seeded
random model whose weights are large enough (0.2·N(0, 1)) that greedy choices are decisive rather than near-ties.
"""

from __future__ import annotations

import torch

from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.tiny import TINY_TEXT_SPECIAL_IDS, tiny_config

IM_START, IM_END = TINY_TEXT_SPECIAL_IDS["<|im_start|>"], TINY_TEXT_SPECIAL_IDS["<|im_end|>"]
AUDIO, AUDIO_BOS, AUDIO_EOS = (
    TINY_TEXT_SPECIAL_IDS["<|AUDIO|>"],
    TINY_TEXT_SPECIAL_IDS["<|audio_bos|>"],
    TINY_TEXT_SPECIAL_IDS["<|audio_eos|>"],
)
PAD = TINY_TEXT_SPECIAL_IDS["<|endoftext|>"]
SPEECH_PAD = 299


class FunAudioChatModelTester:
    """Builds the tiny model and a speech-to-speech prompt batch (user audio with continuous features).

    Row ``r`` has ``audio_frames[r]`` speech frames (25 Hz) and ``4 * audio_frames[r]`` mel frames; rows are
    left-padded to a common length, so a batch of more than one row also exercises padding.
    """

    def __init__(
        self,
        parent=None,
        audio_frames: tuple[int, ...] = (23, 14),
        system_tokens: tuple[int, ...] = (101, 102, 103),
        text_config: dict | None = None,
        audio_config: dict | None = None,
        seed: int = 0,
    ):
        self.parent = parent
        self.audio_frames = audio_frames
        self.batch_size = len(audio_frames)
        self.system_tokens = list(system_tokens)
        self.text_config = text_config or {}
        self.audio_config = audio_config or {}
        self.seed = seed
        self.group_size = 5

    def get_config(self, **overrides):
        text_config = {**self.text_config, **overrides.pop("text_config", {})}
        audio_config = {**self.audio_config, **overrides.pop("audio_config", {})}
        return tiny_config(text_config=text_config, audio_config=audio_config, **overrides)

    def _row_ids(self, frames: int) -> list[int]:
        placeholders = -(-frames // self.group_size)
        return (
            [IM_START, 10, *self.system_tokens, IM_END, IM_START, 11, AUDIO_BOS]
            + [AUDIO] * placeholders
            + [AUDIO_EOS, IM_END, IM_START, 12]
        )

    def prepare_config_and_inputs(self, **config_overrides):
        config = self.get_config(**config_overrides)
        generator = torch.Generator().manual_seed(self.seed)
        rows = [self._row_ids(frames) for frames in self.audio_frames]
        longest = max(len(row) for row in rows)
        input_ids = torch.full((self.batch_size, longest), PAD, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):
            input_ids[r, longest - len(row) :] = torch.tensor(row)
            attention_mask[r, longest - len(row) :] = 1
        speech_width = -(-max(self.audio_frames) // self.group_size) * self.group_size
        speech_attention_mask = (torch.arange(speech_width)[None, :] < torch.tensor(self.audio_frames)[:, None]).long()
        mel_frames = [4 * frames for frames in self.audio_frames]
        features = torch.zeros(self.batch_size, config.audio_config.num_mel_bins, max(mel_frames))
        feature_attention_mask = torch.zeros(self.batch_size, max(mel_frames), dtype=torch.long)
        for r, frames in enumerate(mel_frames):
            features[r, :, :frames] = torch.randn(features.shape[1], frames, generator=generator).clamp(-1.5, 1.5)
            feature_attention_mask[r, :frames] = 1
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": features,
            "feature_attention_mask": feature_attention_mask,
            "feature_exist_mask": torch.ones(self.batch_size, dtype=torch.bool),
            "speech_ids": torch.full((self.batch_size, speech_width), SPEECH_PAD, dtype=torch.long),
            "speech_attention_mask": speech_attention_mask,
        }
        return config, inputs

    def prepare_config_and_inputs_for_common(self, **config_overrides):
        return self.prepare_config_and_inputs(**config_overrides)

    def create_model(self, config=None, attn_implementation: str | None = None):
        """A seeded random model in eval mode (norm weights 1 + 0.1·N, biases 0.1·N, the rest 0.2·N)."""
        config = config if config is not None else self.get_config()
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        torch.manual_seed(self.seed)
        model = FunAudioChatForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                if parameter.dim() == 1 and "norm" in name:
                    parameter.copy_(1 + 0.1 * noise)
                elif parameter.dim() == 1:
                    parameter.copy_(0.1 * noise)
                else:
                    parameter.copy_(0.2 * noise)
        return model.eval()
