"""The Fun-Audio-Chat configuration the generation and DRSR benchmarks share, and its control-token ids.

An 8-layer Qwen3 LLM (width 512 by default) over a 4096-id vocabulary, the released speech codebook (6561 codes + 4
specials) and a 4-layer Speech Refined Head of width 256: large enough that a decode step is dominated by the model's
own matrix products, small enough to run on 2 CPU cores. The encoder size is a parameter: the generation benchmark
runs a real prompt through it, the DRSR benchmark only needs one to exist.
"""

from __future__ import annotations

from fun_audio_chat import FunAudioChatConfig

VOCAB = 4096
PAD, IM_START, IM_END, NEWLINE = 4094, 4080, 4095, 198
AUDIO, ABOS, AEOS, SIL = 4089, 4090, 4091, 4093


def bench_model_config(
    width: int = 512,
    group_size: int = 5,
    encoder_width: int = 256,
    encoder_layers: int = 4,
    encoder_ffn_dim: int = 1024,
) -> FunAudioChatConfig:
    return FunAudioChatConfig(
        text_config={
            "model_type": "qwen3",
            "vocab_size": VOCAB,
            "hidden_size": width,
            "num_hidden_layers": 8,
            "num_attention_heads": width // 64,
            "num_key_value_heads": width // 128,
            "head_dim": 64,
            "intermediate_size": 3 * width,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "eos_token_id": IM_END,
            "pad_token_id": PAD,
            "audio_bos_index": ABOS,
            "audio_eos_index": AEOS,
            "sil_index": SIL,
        },
        audio_config={
            "d_model": encoder_width,
            "encoder_layers": encoder_layers,
            "encoder_attention_heads": encoder_width // 64,
            "encoder_ffn_dim": encoder_ffn_dim,
            "output_dim": width,
            "codebook_size": 6565,
            "group_size": group_size,
            "crq_transformer_config": {
                "model_type": "qwen3",
                "hidden_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 64,
                "intermediate_size": 768,
                "vocab_size": 16,
                "max_position_embeddings": 32768,
            },
        },
        audio_token_index=AUDIO,
    )
