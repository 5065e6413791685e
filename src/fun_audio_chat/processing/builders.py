"""Builders of the production processor parts, in the released ``FunAudioLLM/Fun-Audio-Chat-8B`` layout.

* :func:`build_feature_extractor` — the Whisper feature extractor (128 mel bins, 16 kHz, hop 160, n_fft 400).
* :func:`add_audio_special_tokens` — turns (a copy of) a Qwen3 text tokenizer into the Fun-Audio-Chat one by adding
  ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``, ``<|sil|>`` in that order (ids 151669 …
  151673 on the Qwen3 vocabulary).
* :func:`build_speech_tokenizer` — the ``speech_tokenizer/`` sub-tokenizer for any number of codes (6561 for the
  released model: specials at 6561 bos, 6562 eos, 6563 pad, 6564 ``<|endoftext|>``).
* :func:`build_processor` — assemble a :class:`FunAudioChatProcessor` from a text tokenizer (+ speech tokenizer).

The tiny processor of demos and tests is built from these in :mod:`fun_audio_chat.tiny`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .audio_io import TARGET_SAMPLING_RATE
from .release_layout import SPEECH_TOKENIZER_SUBFOLDER

AUDIO_TEXT_SPECIAL_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|sil|>")
RELEASED_NUM_SPEECH_CODES = 6561
# The specials that follow the codes in the released speech tokenizer, in id order.
RELEASED_SPEECH_SPECIAL_TOKENS = ("<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|endoftext|>")


# The released tokenizer_config.json names the audio tokens as model-specific special tokens (tokenizer.audio_token …).
AUDIO_TOKEN_NAMES = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_pad_token": "<|audio_pad|>",
    "text_sil_token": "<|sil|>",
}


def add_audio_special_tokens(tokenizer):
    """A copy of a Qwen3 text tokenizer turned into the Fun-Audio-Chat one (the argument is not changed).

    On the Qwen3 vocabulary (151669 ids) the new tokens get ids 151669 … 151673 in the order ``<|AUDIO|>``,
    ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``, ``<|sil|>`` — the released layout. Tokens already in
    the vocabulary keep their ids. The copy's eos is ``<|im_end|>``, its pad ``<|endoftext|>``, and the audio tokens
    are named (``tokenizer.audio_token`` …) as in the released ``tokenizer_config.json``.
    """
    import copy
    import tempfile

    from tokenizers import AddedToken

    extended = copy.deepcopy(tokenizer)
    for token in AUDIO_TEXT_SPECIAL_TOKENS:
        if extended.convert_tokens_to_ids(token) in (None, extended.unk_token_id):
            extended.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    # transformers names model-specific special tokens publicly only when a tokenizer is loaded (``<name>_token=``
    # keyword arguments), so the copy is named by a save and reload.
    with tempfile.TemporaryDirectory(prefix="fun_audio_chat_tokenizer_") as folder:
        extended.save_pretrained(folder)
        return type(tokenizer).from_pretrained(
            folder, eos_token="<|im_end|>", pad_token="<|endoftext|>", **AUDIO_TOKEN_NAMES
        )


def build_speech_tokenizer(
    num_codes: int = RELEASED_NUM_SPEECH_CODES,
    audio_group_size: int | None = None,
    special_tokens: Sequence[str] = RELEASED_SPEECH_SPECIAL_TOKENS,
):
    """The ``speech_tokenizer/`` sub-tokenizer: ``[AU0000]`` … ``[AU{num_codes-1}]`` (ids = codes), then
    ``special_tokens`` in that order (released: ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``,
    ``<|endoftext|>`` = 6561, 6562, 6563, 6564). bos/eos/pad are the ``<|audio_…|>`` tokens; ``<|endoftext|>`` is
    an extra special token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    required = {"<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|endoftext|>"}
    if set(special_tokens) != required or len(special_tokens) != len(required):
        raise ValueError(f"special_tokens must order exactly {sorted(required)}, got {list(special_tokens)}.")
    width = max(4, len(str(num_codes - 1)))
    vocab = {f"[AU{code:0{width}d}]": code for code in range(num_codes)}
    for offset, token in enumerate(special_tokens):
        vocab[token] = num_codes + offset
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|audio_pad|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[AU\d+\]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {}
    if audio_group_size is not None:
        kwargs["audio_group_size"] = audio_group_size
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|audio_bos|>",
        eos_token="<|audio_eos|>",
        pad_token="<|audio_pad|>",
        extra_special_tokens=["<|endoftext|>"],
        model_max_length=1_000_000,
        **kwargs,
    )


def build_feature_extractor():
    """The Whisper feature extractor of Fun-Audio-Chat: 128 mel bins, 16 kHz, hop 160, n_fft 400."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=TARGET_SAMPLING_RATE,
        hop_length=160,
        n_fft=400,
        chunk_length=30,
        padding_value=0.0,
        return_attention_mask=True,
    )


def build_processor(
    text_tokenizer, speech_tokenizer=None, num_speech_codes: int = RELEASED_NUM_SPEECH_CODES, **processor_kwargs
):
    """Assemble a :class:`FunAudioChatProcessor` from a text tokenizer (the audio special tokens are added when
    missing) and a speech tokenizer (built with ``num_speech_codes`` codes when not given)."""
    from .chat_template import CHAT_TEMPLATE
    from .processing_fun_audio_chat import FunAudioChatProcessor

    unknown = (None, text_tokenizer.unk_token_id)
    if any(text_tokenizer.convert_tokens_to_ids(token) in unknown for token in AUDIO_TEXT_SPECIAL_TOKENS):
        text_tokenizer = add_audio_special_tokens(text_tokenizer)
    if speech_tokenizer is None:
        speech_tokenizer = build_speech_tokenizer(num_speech_codes)
    processor_kwargs.setdefault("chat_template", CHAT_TEMPLATE)
    return FunAudioChatProcessor(
        feature_extractor=build_feature_extractor(),
        tokenizer=text_tokenizer,
        speech_tokenizer=speech_tokenizer,
        **processor_kwargs,
    )


__all__ = [
    "AUDIO_TEXT_SPECIAL_TOKENS",
    "AUDIO_TOKEN_NAMES",
    "RELEASED_NUM_SPEECH_CODES",
    "RELEASED_SPEECH_SPECIAL_TOKENS",
    "SPEECH_TOKENIZER_SUBFOLDER",
    "add_audio_special_tokens",
    "build_feature_extractor",
    "build_processor",
    "build_speech_tokenizer",
]
