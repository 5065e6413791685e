"""A tiny built-in Fun-Audio-Chat layout for demos, notebooks and tests (no downloads).

The token layout matches the official tiny oracle models: text vocabulary 512 with the special tokens at
500..507, and a speech codebook of 300 (296 codes + BOS/EOS/unused/pad). :func:`tiny_config` and
:func:`tiny_processor` use exactly these ids, so a tiny model and a tiny processor always agree.

The tiny text vocabulary: ids 0-255 are the 256 byte tokens (byte ``b`` has id ``b``, except ``\n`` which has
id 198 as in Qwen's vocabulary), ids 10/11/12 are the role words ``system``/``user``/``assistant`` (as in the oracle
fixtures), then BPE merges of a few common words up to id 499, then the specials 500-507 and the tool tags
``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>`` at 508-511 (non-special, as in Qwen).
The tiny speech tokenizer has 296 codes (``[AU0000]`` … ``[AU0295]``) + ``<|audio_bos|>`` 296, ``<|audio_eos|>``
297, ``<|endoftext|>`` 298, ``<|audio_pad|>`` 299 (the oracle's pad is 299).
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
TINY_SPEECH_SPECIAL_TOKENS = ("<|audio_bos|>", "<|audio_eos|>", "<|endoftext|>", "<|audio_pad|>")  # ids 296..299
TOOL_TAG_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Words merged into single tokens by the tiny BPE (after the role words). Chosen so that merges only start with
# a space or inside these words, which keeps arbitrary text tokenizable byte by byte.
_TINY_WORDS = (
    " the",
    " you",
    " are",
    " to",
    " and",
    " of",
    " a",
    " is",
    " in",
    " it",
    " what",
    " text",
    " speech",
    " tokens",
    " generate",
    " asked",
    " both",
    " at",
    " same",
    " time",
    " function",
    " name",
    " arguments",
    " call",
    " tool",
    " weather",
    " hello",
    " please",
    " can",
    " with",
    " for",
    " this",
    " that",
    " how",
    " me",
    " my",
    " your",
    " do",
    " not",
    " be",
    " on",
    " say",
    " tell",
    " about",
    " today",
    " audio",
    " question",
    " answer",
    " JSON",
    " object",
    " inside",
    " tags",
    " reply",
    " each",
    " help",
    " request",
    " use",
    " one",
    " per",
    " its",
    " own",
    " described",
    " signatures",
    " functions",
    " user",
    " assistant",
    " helpful",
    " thank",
    " good",
    " morning",
    " there",
    " number",
    " string",
    " type",
    " description",
    " properties",
    " required",
    " parameters",
    " city",
    " location",
    " unit",
    " celsius",
)


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
    speech codes into 24 kHz audio-shaped noise, fast enough for demos and tests.

    It knows exactly the tiny model's real codes (``TINY_SPEECH_CODES``), as the released detokenizer knows exactly
    the released model's 6561: a speech-BOS, EOS or pad id that reaches it is an error, not a sound."""
    from .token2wav.configuration_cosyvoice3 import tiny_token2wav_config
    from .token2wav.modeling_cosyvoice3 import random_detokenizer

    config = tiny_token2wav_config()
    config.flow.vocab_size = TINY_SPEECH_CODES
    return random_detokenizer(config, seed)


def tiny_model_and_processor(seed: int = 0):
    """The tiny built-in model (random weights drawn from ``seed``, the global RNG left as it was), in eval mode,
    and its processor."""
    import torch

    from .modeling import FunAudioChatForConditionalGeneration

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = FunAudioChatForConditionalGeneration(tiny_config()).eval()
    finally:
        torch.random.set_rng_state(state)
    return model, tiny_processor()


def tiny_s3_speech_tokenizer(**kwargs):
    """An S3 speech tokenizer with the real architecture at toy sizes and random weights (no downloads; its codes
    are meaningless): for testing a tokenization pipeline. ``kwargs`` go to ``S3SpeechTokenizer`` (batch size,
    device)."""
    from .processing.speech_tokenizer import S3SpeechTokenizer, import_s3tokenizer

    import_s3tokenizer()
    from s3tokenizer.model_v3 import ModelConfigV3

    return S3SpeechTokenizer.random(config=ModelConfigV3(n_audio_state=256, n_audio_head=4, n_audio_layer=2), **kwargs)


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    base_size = min(TINY_TEXT_SPECIAL_IDS.values())  # 500: everything below is the BPE model vocabulary
    role_ids = {"system": 10, "user": 11, "assistant": 12}
    newline_id = 198
    # Bytes whose natural id is taken by "\n" or a role word move to the first free ids after 255.
    displaced = [10, 11, 12, newline_id]
    byte_ids = {b: b for b in range(256)}
    byte_ids[10] = newline_id
    for offset, byte in enumerate(displaced[1:]):
        byte_ids[byte] = 256 + offset
    vocab = {b2u[b]: i for b, i in byte_ids.items()}
    next_id = 256 + len(displaced) - 1
    merges: list[tuple[str, str]] = []

    def add_word(word: str, final_id: int | None = None) -> bool:
        nonlocal next_id
        symbols = "".join(b2u[b] for b in word.encode("utf-8"))
        for end in range(2, len(symbols) + 1):
            piece = symbols[:end]
            if piece in vocab:
                continue
            if end == len(symbols) and final_id is not None:
                token_id = final_id
            elif next_id < base_size:
                token_id = next_id
                next_id += 1
            else:
                return False
            merges.append((symbols[: end - 1], symbols[end - 1]))
            vocab[piece] = token_id
        return True

    for word, token_id in role_ids.items():
        add_word(word, token_id)
    for word in _TINY_WORDS:
        if not add_word(word):
            break
    # Fill any remaining ids below the specials so that the specials land exactly at 500..
    while next_id < base_size:
        vocab[f"<|reserved_{next_id}|>"] = next_id
        next_id += 1
    assert len(vocab) == base_size and sorted(vocab.values()) == list(range(base_size))
    return vocab, merges


def build_tiny_text_tokenizer():
    """The tiny byte-level BPE :class:`~transformers.Qwen2Tokenizer` (512 ids) used by :func:`tiny_processor`."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from .processing.builders import add_audio_special_tokens

    vocab, merges = _tiny_vocab_and_merges()
    # Qwen2Tokenizer adds <|endoftext|> (its unk/eos/pad default) first: id 500.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, model_max_length=1024)
    for token, _ in sorted(TINY_TEXT_SPECIAL_IDS.items(), key=lambda kv: kv[1]):
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    for token in TOOL_TAG_TOKENS:
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
    tokenizer = add_audio_special_tokens(tokenizer)  # the audio tokens are already in place: this names them
    for token, token_id in TINY_TEXT_SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected {token_id}")
    if len(tokenizer) != TINY_TEXT_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} ids, expected {TINY_TEXT_VOCAB_SIZE}")
    return tokenizer


def build_tiny_speech_tokenizer():
    """The tiny ``speech_tokenizer/``: 296 codes, then bos 296, eos 297, ``<|endoftext|>`` 298, pad 299."""
    from .processing.builders import build_speech_tokenizer

    return build_speech_tokenizer(TINY_SPEECH_CODES, special_tokens=TINY_SPEECH_SPECIAL_TOKENS)


def tiny_processor(**processor_kwargs):
    """A fresh tiny :class:`~fun_audio_chat.FunAudioChatProcessor` matching :func:`tiny_config` (no downloads)."""
    from .processing.builders import build_processor

    return build_processor(build_tiny_text_tokenizer(), build_tiny_speech_tokenizer(), **processor_kwargs)
