"""Tokenizer and processor builders: the tiny built-in processor and the official speech-tokenizer layout.

* :func:`tiny_processor` — a complete :class:`FunAudioChatProcessor` made in code (no downloads) whose ids match
  :func:`fun_audio_chat.tiny.tiny_config` and the oracle fixtures: a byte-level BPE text tokenizer of 512 ids with
  the special tokens at :data:`fun_audio_chat.tiny.TINY_TEXT_SPECIAL_IDS`, and a speech tokenizer of 296 codes
  (``[AU0000]`` … ``[AU0295]``) + ``<|audio_bos|>`` 296, ``<|audio_eos|>`` 297, ``<|endoftext|>`` 298,
  ``<|audio_pad|>`` 299.
* :func:`build_speech_tokenizer` — the ``speech_tokenizer/`` sub-tokenizer for any number of codes (6561 for the
  released model: specials at 6561 bos, 6562 eos, 6563 pad, 6564 ``<|endoftext|>``).
* :func:`add_audio_special_tokens` — turns a Qwen3 text tokenizer into the Fun-Audio-Chat one by adding
  ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``, ``<|sil|>`` in that order (ids 151669 …
  151673 on the Qwen3 vocabulary, SPEC §3.1).
* :func:`build_processor` — assemble a processor from a text tokenizer (+ optional speech tokenizer).

The tiny text vocabulary: ids 0-255 are the 256 byte tokens (byte ``b`` has id ``b``, except ``\n`` which has
id 198 as in Qwen's vocabulary), ids 10/11/12 are the role words ``system``/``user``/``assistant`` (as in the oracle
fixtures), then BPE merges of a few common words up to id 499, then the specials 500-507 and the tool tags
``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>`` at 508-511 (non-special, as in Qwen).
"""

from __future__ import annotations

from ..tiny import TINY_SPEECH_CODES, TINY_TEXT_SPECIAL_IDS, TINY_TEXT_VOCAB_SIZE

AUDIO_TEXT_SPECIAL_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|sil|>")
TOOL_TAG_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Words merged into single tokens by the tiny BPE (after the role words). Chosen so that merges only start with
# a space or inside these words, which keeps arbitrary text tokenizable byte by byte.
_TINY_WORDS = (
    " the", " you", " are", " to", " and", " of", " a", " is", " in", " it", " what", " text", " speech",
    " tokens", " generate", " asked", " both", " at", " same", " time", " function", " name", " arguments",
    " call", " tool", " weather", " hello", " please", " can", " with", " for", " this", " that", " how",
    " me", " my", " your", " do", " not", " be", " on", " say", " tell", " about", " today", " audio",
    " question", " answer", " JSON", " object", " inside", " tags", " reply", " each", " help", " request",
    " use", " one", " per", " its", " own", " described", " signatures", " functions", " user", " assistant",
    " helpful", " thank", " good", " morning", " there", " number", " string", " type", " description",
    " properties", " required", " parameters", " city", " location", " unit", " celsius",
)

SPEECH_TOKENIZER_SUBFOLDER = "speech_tokenizer"


def _byte_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = _byte_to_unicode()
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

    vocab, merges = _tiny_vocab_and_merges()
    # Qwen2Tokenizer adds <|endoftext|> (its unk/eos/pad default) first: id 500.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, model_max_length=1024)
    ordered = sorted(TINY_TEXT_SPECIAL_IDS.items(), key=lambda kv: kv[1])
    for token, _ in ordered:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    for token in TOOL_TAG_TOKENS:
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
    _set_text_special_tokens(tokenizer)
    for token, token_id in TINY_TEXT_SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected {token_id}")
    if len(tokenizer) != TINY_TEXT_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} ids, expected {TINY_TEXT_VOCAB_SIZE}")
    return tokenizer


def _set_text_special_tokens(tokenizer) -> None:
    """Named special tokens of the released tokenizer (SPEC §3.1): eos ``<|im_end|>``, pad ``<|endoftext|>`` and the
    audio tokens as model-specific attributes (``tokenizer.audio_token`` …, saved in ``tokenizer_config.json``)."""
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer._set_model_specific_special_tokens(
        special_tokens={
            "audio_token": "<|AUDIO|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
            "audio_pad_token": "<|audio_pad|>",
            "text_sil_token": "<|sil|>",
        }
    )


def add_audio_special_tokens(tokenizer):
    """Add the Fun-Audio-Chat audio special tokens to a Qwen3 text tokenizer (in place; returns it).

    On the Qwen3 vocabulary (151669 ids) the new tokens get ids 151669 … 151673 in the order ``<|AUDIO|>``,
    ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``, ``<|sil|>`` — the released layout. Tokens already in
    the vocabulary keep their ids.
    """
    from tokenizers import AddedToken

    for token in AUDIO_TEXT_SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    _set_text_special_tokens(tokenizer)
    return tokenizer


def build_speech_tokenizer(num_codes: int = 6561, audio_group_size: int | None = None):
    """The ``speech_tokenizer/`` sub-tokenizer: ``[AU0000]`` … ``[AU{num_codes-1}]`` (ids = codes), then
    ``<|audio_bos|>``, ``<|audio_eos|>`` and, in the released order, ``<|audio_pad|>`` then ``<|endoftext|>``
    (6561 codes: 6561, 6562, 6563, 6564). For the tiny layout (296 codes) the oracle uses 299 as pad, so there the
    order is ``<|endoftext|>`` 298 then ``<|audio_pad|>`` 299.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    width = max(4, len(str(num_codes - 1)))
    vocab = {f"[AU{code:0{width}d}]": code for code in range(num_codes)}
    specials = ["<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>", "<|endoftext|>"]
    if num_codes == TINY_SPEECH_CODES:
        specials = ["<|audio_bos|>", "<|audio_eos|>", "<|endoftext|>", "<|audio_pad|>"]
    for offset, token in enumerate(specials):
        vocab[token] = num_codes + offset
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|audio_pad|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[AU\d+\]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {}
    if audio_group_size is not None:
        kwargs["audio_group_size"] = audio_group_size
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|audio_bos|>",
        eos_token="<|audio_eos|>",
        pad_token="<|audio_pad|>",
        extra_special_tokens=["<|endoftext|>"],
        model_max_length=1_000_000,
        **kwargs,
    )
    return tokenizer


def build_feature_extractor():
    """The Whisper feature extractor of Fun-Audio-Chat: 128 mel bins, 16 kHz, hop 160, n_fft 400."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        n_fft=400,
        chunk_length=30,
        padding_value=0.0,
        return_attention_mask=True,
    )


def build_processor(text_tokenizer, speech_tokenizer=None, num_speech_codes: int = 6561, **processor_kwargs):
    """Assemble a :class:`FunAudioChatProcessor` from a text tokenizer (the audio special tokens are added when
    missing) and a speech tokenizer (built with ``num_speech_codes`` codes when not given)."""
    from .chat_template import CHAT_TEMPLATE
    from .processing_fun_audio_chat import FunAudioChatProcessor

    if any(text_tokenizer.convert_tokens_to_ids(t) in (None, text_tokenizer.unk_token_id) for t in AUDIO_TEXT_SPECIAL_TOKENS):
        add_audio_special_tokens(text_tokenizer)
    if speech_tokenizer is None:
        speech_tokenizer = build_speech_tokenizer(num_speech_codes)
    processor_kwargs.setdefault("chat_template", CHAT_TEMPLATE)
    return FunAudioChatProcessor(
        feature_extractor=build_feature_extractor(),
        tokenizer=text_tokenizer,
        speech_tokenizer=speech_tokenizer,
        **processor_kwargs,
    )


def tiny_processor(**processor_kwargs):
    """A fresh tiny :class:`FunAudioChatProcessor` matching :func:`fun_audio_chat.tiny.tiny_config` (no downloads)."""
    return build_processor(build_tiny_text_tokenizer(), build_speech_tokenizer(TINY_SPEECH_CODES), **processor_kwargs)


__all__ = [
    "AUDIO_TEXT_SPECIAL_TOKENS",
    "SPEECH_TOKENIZER_SUBFOLDER",
    "TOOL_TAG_TOKENS",
    "add_audio_special_tokens",
    "build_feature_extractor",
    "build_processor",
    "build_speech_tokenizer",
    "build_tiny_text_tokenizer",
    "tiny_processor",
]
