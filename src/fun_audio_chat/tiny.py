"""A tiny built-in Fun-Audio-Chat layout for demos, notebooks and tests (no downloads).

The token layout matches the official tiny oracle models: text vocabulary 512 with the special tokens at
500..507, and a speech codebook of 300 (296 codes + BOS/EOS/unused/pad). The tiny processor built by
:mod:`fun_audio_chat.processing` uses exactly these ids, so a tiny model and a tiny processor always agree.
"""

from __future__ import annotations

from .configuration_fun_audio_chat import FunAudioChatConfig

TINY_TEXT_SPECIAL_IDS = {
    "<|endoftext|>": 500,
    "<|im_start|>": 501,
    "<|im_end|>": 502,
    "<|audio_bos|>": 503,
    "<|audio_eos|>": 504,
    "<|AUDIO|>": 505,
    "<|sil|>": 506,
    "<|audio_pad|>": 507,
}
TINY_TEXT_VOCAB_SIZE = 512
TINY_SPEECH_CODES = 296  # real codes 0..295, then BOS 296, EOS 297, (298 unused), PAD 299
TINY_SPEECH_CODEBOOK = 300


def tiny_config(**overrides) -> FunAudioChatConfig:
    """The oracle's tiny configuration (text hidden 64, 2 layers; SRH hidden 32, 2 layers)."""
    text_config = {
        "model_type": "qwen3",
        "vocab_size": TINY_TEXT_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "pad_token_id": TINY_TEXT_SPECIAL_IDS["<|endoftext|>"],
        "bos_token_id": TINY_TEXT_SPECIAL_IDS["<|endoftext|>"],
        "eos_token_id": TINY_TEXT_SPECIAL_IDS["<|im_end|>"],
        "audio_bos_index": TINY_TEXT_SPECIAL_IDS["<|audio_bos|>"],
        "audio_eos_index": TINY_TEXT_SPECIAL_IDS["<|audio_eos|>"],
        "sil_index": TINY_TEXT_SPECIAL_IDS["<|sil|>"],
    }
    audio_config = {
        "num_mel_bins": 128,
        "d_model": 64,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "n_window": 100,
        "max_source_positions": 1500,
        "output_dim": 64,
        "codebook_size": TINY_SPEECH_CODEBOOK,
        "bos_token_id": 296,
        "eos_token_id": 297,
        "pad_token_id": 299,
        "group_size": 5,
        "continuous_features_mode": "replace",
        "enable_audio_invert_tower": True,
        "crq_transformer_config": {
            "model_type": "qwen3",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": 16,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
        },
    }
    text_config.update(overrides.pop("text_config", {}))
    audio_config.update(overrides.pop("audio_config", {}))
    return FunAudioChatConfig(
        text_config=text_config,
        audio_config=audio_config,
        audio_token_index=TINY_TEXT_SPECIAL_IDS["<|AUDIO|>"],
        **overrides,
    )


def tiny_detokenizer(seed: int = 0):
    """A CosyVoice 3 detokenizer with the real structure at toy sizes and random weights (no downloads): it turns
    speech codes into 24 kHz audio-shaped noise, fast enough for demos and tests."""
    from .token2wav.configuration import tiny_token2wav_config
    from .token2wav.detokenizer import random_detokenizer

    return random_detokenizer(tiny_token2wav_config(), seed)
