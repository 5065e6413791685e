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
"""``FunAudioChatProcessor``: Whisper features + Qwen text tokenizer + speech tokenizer, in the official file layout.

On disk (the official ``FunAudioLLM/Fun-Audio-Chat-8B`` layout)::

    processor_config.json      {"audio_bos_token", "audio_eos_token", "audio_group_size": 5, "audio_pad_token",
                                "audio_token", "processor_class": "FunAudioChatProcessor"}
    preprocessor_config.json   WhisperFeatureExtractor (128 mel bins, 16 kHz, hop 160, n_fft 400)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt     the text tokenizer
    chat_template.jinja        the chat template
    speech_tokenizer/          tokenizer.json, tokenizer_config.json, special_tokens_map.json

``AutoProcessor.from_pretrained(dir)`` loads it once :mod:`fun_audio_chat` is imported; ``save_pretrained`` writes it
back in the same layout (the files transformers 5 does not write itself, and why each is there:
:mod:`fun_audio_chat.processing.release_layout`), and transformers' ``push_to_hub`` uploads it (the model card is
:func:`fun_audio_chat.hub.push_with_model_card`'s job).

Model inputs returned by ``processor(text=..., audio=...)`` and by
``processor.apply_chat_template(..., tokenize=True, return_dict=True)``:

=========================  ==========================================================================================
``input_ids``              (B, L) prompts with each ``<|AUDIO|>`` expanded to ``ceil(int(duration*25)/5)`` copies
                           between ``<|audio_bos|>`` and ``<|audio_eos|>``; left padded by default (generation)
``attention_mask``         (B, L)
``input_features``         (N_audio, 128, T) log-mel features of every audio, covering the whole clip (no 30 s cut);
                           T = 3000 (Whisper's 30 s window, as the official processor) or the longest clip's frames
                           when longer; ``audio_kwargs={"padding": "longest"}`` gives the longest clip's frames
``feature_attention_mask`` (N_audio, T), ``ceil(num_samples / 160)`` valid frames per clip
``feature_exist_mask``     (N_audio,) bool, True for every audio with continuous features (all user audio)
``speech_ids``             (N_audio, S) speech pad id x ``int(duration*25)``, padded to a multiple of 5
``speech_attention_mask``  (N_audio, S), 0 on the padding
=========================  ==========================================================================================

Audio rows are in the order the placeholders appear (sample by sample).
"""

# No ``from __future__ import annotations`` here: transformers reads the annotations of the ProcessingKwargs
# TypedDicts below at run time (ProcessorMixin._merge_kwargs), so they must be real types, not strings.
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import auto_docstring, logging

from ..configuration_fun_audio_chat import AUDIO_INPUT_NAMES
from ..speech_codes import SPEECH_FRAME_RATE
from ._values import to_list
from .audio_io import (
    DEFAULT_AUDIO_LOADING_POLICY,
    TARGET_SAMPLING_RATE,
    AudioInputError,
    AudioLoadingPolicy,
    is_raw_array,
    is_single_audio,
    load_audio,
    speech_frames,
)
from .chat_template import CHAT_TEMPLATE, is_fun_audio_chat_template
from .conversation import check_template_flags, split_batch, validate_conversation, validate_tools
from .prompts import SPEECH_DELAY_TOKENS
from .release_layout import write_release_layout
from .training_examples import build_training_example


def _not_marked_by_user() -> str:
    """A regex lookbehind that skips the control tokens a user wrote into a message: under
    ``apply_chat_template(sanitize_control_tokens=True)`` transformers wraps them in markers with its public
    ``mark_control_tokens``, so such an ``<|AUDIO|>`` is text, not a placeholder. The marker is read from that function's
    output rather than from transformers' private constant; without the function nothing is marked."""
    try:
        from transformers.utils.chat_template_utils import mark_control_tokens
    except ImportError:  # pragma: no cover - a transformers without control-token sanitising
        return ""
    probe = "<|AUDIO|>"
    marked = mark_control_tokens(probe, re.compile(re.escape(probe)))
    marker = marked[: marked.index(probe)]
    return f"(?<!{re.escape(marker)})" if marker else ""


_UNMARKED = _not_marked_by_user()

logger = logging.get_logger(__name__)

HOP_LENGTH = 160
# The official training context is 2048 LLM positions; audio alone at 5 positions per second fills it in 409.6 s.
DEFAULT_MAX_AUDIO_SECONDS = 2048 / 5

# Whisper's window: the official processor pads every clip's features to 30 s (3000 mel frames).
WHISPER_WINDOW_SAMPLES = 30 * TARGET_SAMPLING_RATE

# Where a folder keeps its speech detokenizer (codes -> 24 kHz audio), next to the model and processor files.
DETOKENIZER_SUBFOLDER = "token2wav"
# The processor's from_pretrained arguments that also apply to loading the detokenizer of the same folder or repo.
_DETOKENIZER_LOADING_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")

_OFFICIAL_CONFIG_KEYS = ("audio_bos_token", "audio_eos_token", "audio_group_size", "audio_pad_token", "audio_token")
_EXTRA_CONFIG_DEFAULTS = {
    "max_audio_seconds": DEFAULT_MAX_AUDIO_SECONDS,
    "text_sil_token": "<|sil|>",
    "keep_chat_template": False,
}


class FunAudioChatAudioKwargs(AudioKwargs, total=False):
    """
    sampling_rate (`int`, *optional*):
        Rate of raw sample arrays (files, bytes and datasets dicts carry their own). Checked by our audio loader, which
        names the problem (``"16k"``, 0, NaN …) instead of a generic type error.
    """

    sampling_rate: Any


class FunAudioChatProcessorKwargs(ProcessingKwargs, total=False):
    audio_kwargs: FunAudioChatAudioKwargs


@auto_docstring(
    custom_intro="""Processor of Fun-Audio-Chat: a Whisper feature extractor, the Qwen text tokenizer and the speech tokenizer.

    Speech replies to audio: `post_process_multimodal_output` (what transformers' `any-to-any` pipeline calls) turns
    generated speech ids into waveforms with `processor.detokenizer`, a codes -> waveform model such as
    `fun_audio_chat.CosyVoice3Detokenizer`. `from_pretrained` finds it in the folder's (or Hub repo's) `token2wav/`
    subfolder and loads it on first use; `from_pretrained(..., detokenizer=model)` or `processor.detokenizer = model`
    passes one in, and `save_pretrained` writes the one it holds to `token2wav/`. It is a model, not a processor part:
    `processor_config.json` never names it.

    Audio sources: `processor.audio_loading_policy` (a `fun_audio_chat.processing.AudioLoadingPolicy`) says whether
    audio given as a local path or an URL may be opened, for `processor(audio=...)` and for the audio items of
    `apply_chat_template`. The default allows both; a server taking conversations from users sets
    `AudioLoadingPolicy.in_memory_only()`. It is a runtime setting, not saved with the processor.
    """
)
class FunAudioChatProcessor(ProcessorMixin):
    valid_processor_kwargs = FunAudioChatProcessorKwargs
    # Defaults of __call__ as processor attributes (the lowest priority of ProcessorMixin._merge_kwargs, the place
    # transformers recommends over ProcessingKwargs._defaults): left padding for generation; the chat template writes
    # every special token itself.
    text_kwargs = {"padding": True, "padding_side": "left", "add_special_tokens": False}
    # Feature extraction follows the feature extractor's own defaults (Whisper: padding="max_length" to its 30 s
    # window, as the official processor), so calling it with the processor's merged kwargs gives the processor's
    # features; the one setting of ours: never truncate (longer clips keep all their frames; max_audio_seconds
    # bounds them).
    audio_kwargs = {"truncation": False}
    audio_loading_policy: AudioLoadingPolicy = DEFAULT_AUDIO_LOADING_POLICY
    # The detokenizer, or where to load it from on first use (see the class docstring).
    _detokenizer = None
    _detokenizer_source: tuple[str, dict] | None = None

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        speech_tokenizer=None,
        chat_template=None,
        audio_token: str = "<|AUDIO|>",
        audio_bos_token: str = "<|audio_bos|>",
        audio_eos_token: str = "<|audio_eos|>",
        audio_pad_token: str = "<|audio_pad|>",
        audio_group_size: int = 5,
        max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
        text_sil_token: str = "<|sil|>",
        keep_chat_template: bool = False,
    ):
        r"""
        speech_tokenizer (`PreTrainedTokenizerFast`):
            The speech tokenizer (`speech_tokenizer/` subfolder): ids `0 .. codes-1` are the S3 speech codes
            `[AU0000]` ..., followed by `<|audio_bos|>`, `<|audio_eos|>`, `<|audio_pad|>`. The built-in Fun-Audio-Chat
            chat template renders conversations when `chat_template` is not given.
        audio_token (`str`, *optional*, defaults to `"<|AUDIO|>"`):
            The placeholder of one 5 Hz audio position in the text.
        audio_bos_token (`str`, *optional*, defaults to `"<|audio_bos|>"`):
            The text token opening an audio span.
        audio_eos_token (`str`, *optional*, defaults to `"<|audio_eos|>"`):
            The text token closing an audio span.
        audio_pad_token (`str`, *optional*, defaults to `"<|audio_pad|>"`):
            The text audio-padding token.
        audio_group_size (`int`, *optional*, defaults to 5):
            Speech codes (25 Hz) per LLM position (5 Hz).
        max_audio_seconds (`float`, *optional*, defaults to 409.6):
            Longest accepted clip (the 2048-position training context at 5 Hz); `None` disables the check. Longer
            audio raises instead of being truncated.
        text_sil_token (`str`, *optional*, defaults to `"<|sil|>"`):
            The text silence token that pads transcripts.
        keep_chat_template (`bool`, *optional*, defaults to `False`):
            Written to `processor_config.json` by `save_pretrained` when the processor's chat template was chosen by
            its user (not the built-in one): `from_pretrained` then loads that template as it is instead of rendering
            with the built-in one.
        """
        if tokenizer is None or feature_extractor is None:
            raise ValueError("FunAudioChatProcessor needs a feature_extractor and a tokenizer.")
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        self.audio_token = getattr(tokenizer, "audio_token", None) or audio_token
        self.audio_bos_token = getattr(tokenizer, "audio_bos_token", None) or audio_bos_token
        self.audio_eos_token = getattr(tokenizer, "audio_eos_token", None) or audio_eos_token
        self.audio_pad_token = getattr(tokenizer, "audio_pad_token", None) or audio_pad_token
        self.text_sil_token = getattr(tokenizer, "text_sil_token", None) or text_sil_token
        self.audio_group_size = int(audio_group_size)
        self.max_audio_seconds = max_audio_seconds
        self.keep_chat_template = bool(keep_chat_template)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.audio_token)
        if speech_tokenizer is None or not _is_speech_tokenizer(speech_tokenizer):
            found = "none was given" if speech_tokenizer is None else "the one given has no [AU0000] … vocabulary"
            raise ValueError(
                f"FunAudioChatProcessor needs the speech tokenizer of the checkpoint ({found}; when loading a folder, "
                "its speech_tokenizer/ subfolder is missing or is not a Fun-Audio-Chat speech tokenizer). Copy "
                "speech_tokenizer/ from the released FunAudioLLM/Fun-Audio-Chat-8B repository, or pass "
                "speech_tokenizer=fun_audio_chat.processing.build_speech_tokenizer(num_codes) with the codebook size "
                "of your model (6561 for the release)."
            )
        super().__init__(feature_extractor, tokenizer, speech_tokenizer, chat_template=chat_template)
        for name in ("audio_token", "audio_bos_token", "audio_eos_token"):
            token = getattr(self, name)
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ValueError(f"The text tokenizer has no {token} token ({name}); add the audio special tokens.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, chat_template=None, detokenizer=None, **kwargs):
        """``ProcessorMixin.from_pretrained``, plus the folder's detokenizer and one rule about the chat template.

        Detokenizer: ``detokenizer=`` (a codes -> waveform model) is used as given; otherwise a ``token2wav/``
        subfolder of the folder or Hub repo is remembered and loaded with ``AutoModel`` the first time
        ``processor.detokenizer`` is needed (text-only use never loads it). ``cache_dir``, ``token``, ``revision``,
        ``local_files_only``, ``force_download`` and ``proxies`` apply to it too.

        Chat template: conversations render in the Fun-Audio-Chat prompt layout whatever template the folder
        carries: a template written by this library is used as it is; any other one (e.g. the Qwen2-Audio style
        default of the official processor, which renders typed audio items as ``Audio N: ...`` lines and ignores
        ``tools=`` and ``speech_output=``) is kept as ``processor.checkpoint_chat_template`` and the built-in
        template renders instead. An explicit ``chat_template=`` (here, in the constructor or in
        ``apply_chat_template``) is always used exactly as given, and so is a template its user set on a processor
        this library saved (``processor.chat_template = ...`` then ``save_pretrained``, which records
        ``keep_chat_template``).
        """
        if chat_template is not None:
            processor = super().from_pretrained(
                pretrained_model_name_or_path, *args, chat_template=chat_template, **kwargs
            )
        else:
            processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            if not processor.keep_chat_template and not is_fun_audio_chat_template(processor.chat_template):
                if processor.chat_template:
                    logger.info(
                        "The chat template saved with this processor does not render typed audio items, tools and "
                        "speech_output= in the Fun-Audio-Chat layout; the built-in template renders conversations "
                        "(the saved one is processor.checkpoint_chat_template; pass chat_template= to use it)."
                    )
                processor.checkpoint_chat_template = processor.chat_template
                processor.chat_template = CHAT_TEMPLATE
        if detokenizer is not None:
            processor.detokenizer = detokenizer
        else:
            source = os.fspath(pretrained_model_name_or_path)
            loading = {key: kwargs[key] for key in _DETOKENIZER_LOADING_KWARGS if key in kwargs}
            if _holds_detokenizer(source, loading):
                processor._detokenizer_source = (source, loading)
        return processor

    # ------------------------------------------------------------------ detokenizer
    @property
    def detokenizer(self):
        """The codes -> waveform model of :meth:`post_process_multimodal_output` (``None`` when there is none)."""
        if self._detokenizer is None and self._detokenizer_source is not None:
            from transformers import AutoModel

            source, loading = self._detokenizer_source
            self._detokenizer = AutoModel.from_pretrained(_detokenizer_folder(source, loading)).eval()
            self._detokenizer_source = None
        return self._detokenizer

    @detokenizer.setter
    def detokenizer(self, model) -> None:
        if model is not None and not callable(model):
            raise TypeError(
                f"detokenizer must be a codes -> waveform model (e.g. fun_audio_chat.CosyVoice3Detokenizer), got "
                f"{type(model).__name__}."
            )
        self._detokenizer, self._detokenizer_source = model, None

    # ------------------------------------------------------------------ ids
    @property
    def audio_bos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_bos_token)

    @property
    def audio_eos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_eos_token)

    @property
    def text_sil_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.text_sil_token)

    @property
    def im_end_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    @property
    def text_pad_token_id(self) -> int:
        """Padding id of text sequences and transcripts (``<|endoftext|>``; falls back to eos)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def speech_bos_token_id(self) -> int:
        return self.speech_tokenizer.bos_token_id

    @property
    def speech_eos_token_id(self) -> int:
        return self.speech_tokenizer.eos_token_id

    @property
    def speech_pad_token_id(self) -> int:
        return self.speech_tokenizer.pad_token_id

    @property
    def num_speech_codes(self) -> int:
        """Number of real speech codes (6561 for the release, 296 for the tiny layout)."""
        return _count_code_tokens(self.speech_tokenizer)

    @property
    def speech_delay_tokens(self) -> int:
        return SPEECH_DELAY_TOKENS

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *AUDIO_INPUT_NAMES]

    # ------------------------------------------------------------------ audio helpers
    def num_speech_frames(self, num_samples: int) -> int:
        """25 Hz speech frames of a 16 kHz clip: ``int(duration * 25)`` (official count)."""
        return speech_frames(num_samples, TARGET_SAMPLING_RATE, SPEECH_FRAME_RATE)

    def num_audio_tokens(self, num_samples: int) -> int:
        """``<|AUDIO|>`` positions of a 16 kHz clip: ``ceil(int(duration * 25) / audio_group_size)``."""
        return math.ceil(self.num_speech_frames(num_samples) / self.audio_group_size)

    def load_audio(
        self,
        audio: Any,
        sampling_rate: int | None = None,
        name: str | None = None,
        policy: AudioLoadingPolicy | None = None,
    ) -> np.ndarray:
        """Load one audio input (see :func:`fun_audio_chat.processing.audio_io.load_audio`) and check its length.
        ``policy`` defaults to ``self.audio_loading_policy``."""
        waveform = load_audio(
            audio,
            sampling_rate=sampling_rate,
            target_sampling_rate=TARGET_SAMPLING_RATE,
            name=name,
            policy=policy or self.audio_loading_policy,
        )
        self._check_audio_length(waveform, name)
        return waveform

    def _check_audio_length(self, waveform: np.ndarray, name: str | None) -> None:
        prefix = f"{name}: " if name else ""
        if self.num_speech_frames(len(waveform)) == 0:
            raise AudioInputError(
                f"{prefix}audio is too short ({len(waveform)} samples at 16 kHz, "
                f"{1000 * len(waveform) / TARGET_SAMPLING_RATE:.1f} ms): it must last at least 40 ms "
                "(one 25 Hz speech frame)."
            )
        if self.max_audio_seconds is not None:
            seconds = len(waveform) / TARGET_SAMPLING_RATE
            if seconds > self.max_audio_seconds:
                positions = self.num_audio_tokens(len(waveform))
                raise AudioInputError(
                    f"{prefix}audio lasts {seconds:.1f} s and needs {positions} LLM positions, longer than the model "
                    f"context for audio (max_audio_seconds={self.max_audio_seconds:g} s). Split the clip, or raise "
                    "processor.max_audio_seconds if your model handles longer inputs."
                )

    def extract_features(self, waveforms: Sequence[np.ndarray], max_length: int | None = None) -> dict[str, np.ndarray]:
        """Log-mel features of 16 kHz clips, each covering its whole clip (never truncated).

        Each clip is featurized on its own, zero-padded to at least ``max_length`` samples and far enough past its
        end that its valid frames are the ones the official processor computes (it pads to 30 s), so features do not
        depend on the other clips of the batch. Returns ``input_features`` (N, 128, T) float32 and
        ``feature_attention_mask`` (N, T) int64 with ``ceil(num_samples / 160)`` ones.

        ``max_length=None`` (training batches): T = the longest clip's frame count, zeros after each clip.
        ``max_length=480000`` (``processor(audio=...)``'s default): T = 3000 or the longest clip's frames, each clip's
        frames as ``WhisperFeatureExtractor(clip, padding="max_length", max_length=480000)`` computes them.
        """
        window = 0 if max_length is None else int(max_length) // HOP_LENGTH
        frames, feats = [], []
        for waveform in waveforms:
            num_samples = len(waveform)
            valid = math.ceil(num_samples / HOP_LENGTH)
            padded = HOP_LENGTH * math.ceil((num_samples + 3 * self.feature_extractor.n_fft // 2) / HOP_LENGTH)
            out = self.feature_extractor(
                np.asarray(waveform, dtype=np.float32),
                sampling_rate=TARGET_SAMPLING_RATE,
                padding="max_length",
                max_length=max(padded, window * HOP_LENGTH),
                truncation=False,
                return_attention_mask=False,
                return_tensors="np",
            )
            # Inside the window the feature extractor's own padding frames are kept (what it returns when called
            # directly); past a clip's end outside it, zeros.
            feats.append(np.asarray(out["input_features"][0][:, : max(valid, window)], dtype=np.float32))
            frames.append(valid)
        width = max([window, *(feat.shape[-1] for feat in feats)]) if feats else 0
        num_mel = self.feature_extractor.feature_size
        input_features = np.zeros((len(feats), num_mel, width), dtype=np.float32)
        feature_attention_mask = np.zeros((len(feats), width), dtype=np.int64)
        for row, (feat, valid) in enumerate(zip(feats, frames)):
            input_features[row, :, : feat.shape[-1]] = feat
            feature_attention_mask[row, :valid] = 1
        return {"input_features": input_features, "feature_attention_mask": feature_attention_mask}

    def user_speech_ids(
        self, num_frames: Sequence[int], pad_to_multiple_of: int | None = None
    ) -> dict[str, np.ndarray]:
        """Speech ids of user audio: the speech pad id x ``int(duration*25)`` per clip (overwritten by the
        continuous features in the model), right padded to a multiple of ``audio_group_size`` (mask 0 on padding)."""
        multiple = pad_to_multiple_of or self.audio_group_size
        longest = max(num_frames) if num_frames else 0
        width = multiple * math.ceil(longest / multiple)
        speech_ids = np.full((len(num_frames), width), self.speech_pad_token_id, dtype=np.int64)
        speech_attention_mask = np.zeros((len(num_frames), width), dtype=np.int64)
        for row, count in enumerate(num_frames):
            speech_attention_mask[row, :count] = 1
        return {"speech_ids": speech_ids, "speech_attention_mask": speech_attention_mask}

    # ------------------------------------------------------------------ main call
    @auto_docstring(
        custom_intro="""Tokenize prompts and featurize their audio.

        `text` holds one `<|AUDIO|>` placeholder per audio (usually from the chat template; a bare `<|AUDIO|>` gets
        `<|audio_bos|>`/`<|audio_eos|>` added around it), each expanded to the clip's number of 5 Hz positions;
        `audio` is one audio or a list of audios for all prompts, in placeholder order, in any form
        `fun_audio_chat.processing.audio_io.load_audio` accepts. Raw arrays given without `sampling_rate` are taken at
        the feature extractor's rate (16 kHz), as the official processor does (with a one-time warning); other rates
        are resampled. Text is left padded by default (generation). Audio features cover Whisper's 30 s window (longer
        clips all their frames; `audio_kwargs={"padding": "longest"}` for the longest clip's frames) and are never
        truncated. An argument this processor does not know is reported by transformers' logger and ignored.
        """
    )
    def __call__(
        self,
        text: str | list[str] | None = None,
        audio: Any = None,
        **kwargs: Unpack[FunAudioChatProcessorKwargs],
    ) -> BatchFeature:
        # The tokenizer's own init-time settings (padding="max_length", max_length=... given when it was built) rank
        # above the processor's defaults and below call-time arguments, as for every in-tree processor.
        output_kwargs = self._merge_kwargs(
            FunAudioChatProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_text_replacement_offsets = bool(output_kwargs.get("return_text_replacement_offsets"))
        for processor_only in ("return_text_replacement_offsets", "return_mm_token_type_ids"):
            text_kwargs.pop(processor_only, None)
        if text is None and audio is None:
            raise ValueError("Provide `text` and/or `audio`.")

        audio_kwargs = output_kwargs["audio_kwargs"]
        waveforms = self._load_audio_list(audio, audio_kwargs.get("sampling_rate"))
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(sample, str) for sample in texts):
                raise ValueError("`text` must be a string or a list of strings.")
        data = self.encode_prompts(
            texts,
            waveforms,
            feature_window=self._feature_window(audio_kwargs) if waveforms else None,
            return_text_replacement_offsets=return_text_replacement_offsets,
            **text_kwargs,
        )
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def encode_prompts(
        self,
        texts: Sequence[str] | None,
        waveforms: Sequence[np.ndarray],
        feature_window: int | None = None,
        return_text_replacement_offsets: bool = False,
        **tokenizer_kwargs,
    ) -> dict[str, Any]:
        """The one step that turns prompts and their loaded audio into model inputs: ``__call__`` runs it after
        merging its kwargs and loading the audio, and training examples
        (:func:`~fun_audio_chat.processing.training_examples.build_training_example`) run it on their prompt.

        Args:
            texts: prompts holding one ``<|AUDIO|>`` placeholder per clip, in clip order; a bare placeholder gets
                ``<|audio_bos|>``/``<|audio_eos|>`` around it, and each is expanded to its clip's
                :meth:`num_audio_tokens` copies before tokenizing. ``None`` encodes the audio alone.
            waveforms: the 16 kHz clips, as :meth:`load_audio` returns them (already checked).
            feature_window: ``max_length`` (samples) of :meth:`extract_features`; ``None`` for the longest clip.
            return_text_replacement_offsets: also return where each placeholder was expanded (transformers'
                ``get_text_with_replacements`` offsets).
            tokenizer_kwargs: passed to the text tokenizer (padding, ``add_special_tokens`` …); an attention mask
                is always returned.

        Returns the tokenizer's ``input_ids`` and ``attention_mask`` (when ``texts`` is given), and when there is
        audio: ``input_features`` and ``feature_attention_mask`` (:meth:`extract_features`), ``feature_exist_mask``
        (all True: every clip is user audio with features) and one audio row per clip, ``speech_ids`` and
        ``speech_attention_mask`` (:meth:`user_speech_ids`). Arrays are numpy; tensors are ``__call__``'s job.
        """
        data: dict[str, Any] = {}
        if texts is not None:
            expanded = self._check_and_expand(list(texts), waveforms)
            expanded, offsets = self.get_text_with_replacements(
                expanded, audio_replacements=[self.audio_token * self.num_audio_tokens(len(w)) for w in waveforms]
            )
            # apply_chat_template(..., sanitize_control_tokens=True) marks the control tokens of user text; the
            # tokenizer (which gets that flag in tokenizer_kwargs) encodes them as plain text, not as placeholders
            text_inputs = self.tokenizer(expanded, **{**tokenizer_kwargs, "return_attention_mask": True})
            self._check_special_mm_tokens(expanded, text_inputs, modalities=["audio"])
            data.update(text_inputs)
            if return_text_replacement_offsets:
                data["text_replacement_offsets"] = offsets
        if waveforms:
            data.update(self.extract_features(waveforms, max_length=feature_window))
            data["feature_exist_mask"] = np.ones(len(waveforms), dtype=bool)
            data.update(self.user_speech_ids([self.num_speech_frames(len(w)) for w in waveforms]))
        return data

    def _feature_window(self, audio_kwargs: dict) -> int | None:
        """The ``max_length`` (samples) features are padded to: the padding setting read as the feature extractor
        reads it (``"max_length"``, its default: up to ``max_length``, default its 30 s window; ``"longest"``/``True``:
        the longest clip; ``"do_not_pad"``/``False`` has no meaning for a batch of clips and is refused). Audio is
        never truncated."""
        padding = audio_kwargs.get("padding", "max_length")
        if padding in (True, "longest"):
            return None
        if padding == "max_length":
            window = getattr(self.feature_extractor, "n_samples", None) or WHISPER_WINDOW_SAMPLES
            return int(audio_kwargs.get("max_length") or window)
        raise ValueError(
            f"audio padding={padding!r} is not supported: clips are batched into one (N, 128, T) tensor; pass "
            'audio_kwargs={"padding": "longest"} for the longest clip\'s frames or "max_length" (the default, 30 s).'
        )

    def _load_audio_list(self, audio: Any, sampling_rate: int | None) -> list[np.ndarray]:
        if audio is None:
            return []
        if (isinstance(audio, np.ndarray) or hasattr(audio, "detach")) and audio.ndim == 2:
            # (2, N) could be a stereo clip or two clips, (N, 2) a stereo clip or N clips: never guess
            raise AudioInputError(
                f"audio is a 2-D array of shape {tuple(audio.shape)}: pass one clip as a 1-D array, several clips as "
                "a list of 1-D arrays, or a multichannel clip inside a list ([clip], (channels, time) or (time, "
                "channels)) to have its channels averaged to mono."
            )
        if is_single_audio(audio):
            audio = [audio]
        waveforms = []
        for index, item in enumerate(audio):
            rate = sampling_rate
            if rate is None and is_raw_array(item):
                # The official calling convention (processor(text=..., audio=[librosa.load(path, sr=16000)[0]])):
                # bare arrays are at the feature extractor's rate.
                rate = TARGET_SAMPLING_RATE
                logger.warning_once(
                    f"processor(audio=...) got raw arrays without sampling_rate=; taking them at {rate} Hz (the "
                    "feature extractor's rate). Pass sampling_rate= to have other rates resampled."
                )
            waveforms.append(self.load_audio(item, sampling_rate=rate, name=f"audio {index}"))
        return waveforms

    def _check_and_expand(self, texts: list[str], waveforms: list[np.ndarray]) -> list[str]:
        """Check placeholder/audio counts and make sure every placeholder sits between audio_bos and audio_eos."""
        pattern = re.compile(_UNMARKED + re.escape(self.audio_token))
        counts = [len(pattern.findall(sample)) for sample in texts]
        if sum(counts) != len(waveforms):
            raise ValueError(
                f"Found {sum(counts)} {self.audio_token} placeholder(s) in the text ({counts} per prompt) but "
                f"{len(waveforms)} audio input(s) were given; pass exactly one audio per placeholder."
            )
        bos, eos, tok = (re.escape(t) for t in (self.audio_bos_token, self.audio_eos_token, self.audio_token))
        full = re.compile(f"{_UNMARKED}(?:{bos})?{tok}(?:{eos})?")
        return [full.sub(self.audio_bos_token + self.audio_token + self.audio_eos_token, sample) for sample in texts]

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """``ProcessorMixin.apply_chat_template`` after checking the conversation: with the built-in template, an
        unknown role, content of the wrong type, an item other than text/audio, a tool result without a call, a
        malformed tool schema or an empty conversation is an error instead of a silently wrong prompt; a misspelled
        template flag (``speech_ouput=``) is an error with any template."""
        check_template_flags(kwargs)
        template = chat_template if chat_template is not None else self.chat_template
        if is_fun_audio_chat_template(template):
            conversations = split_batch(conversation)
            for index, messages in enumerate(conversations):
                validate_conversation(messages, index if len(conversations) > 1 else None)
            validate_tools(kwargs.get("tools"))
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def audios_in_conversation(self, conversation) -> list[np.ndarray]:
        """The 16 kHz waveforms of the audio items the chat template turns into ``<|AUDIO|>`` placeholders, in
        placeholder order: the audio of user turns (assistant replies, tool results and the leading system prompt
        are rendered as history text, so their audio is not an input). ``conversation`` is one conversation (a list
        of messages) or a batch of them; a batch gives one flat list, as ``processor(audio=...)`` takes it.

        Each item is loaded with :meth:`load_audio` under ``self.audio_loading_policy``: ``"audio"`` (an array,
        bytes, a datasets dict …; a ``"sampling_rate"`` key in the item gives the rate of a raw array), ``"path"``
        or ``"url"``."""
        waveforms: list[np.ndarray] = []
        for messages in split_batch(conversation):
            for index, message in enumerate(messages):
                role, content = message.get("role"), message.get("content")
                if role in ("assistant", "tool") or (index == 0 and role == "system"):
                    continue
                if not isinstance(content, (list, tuple)):
                    continue
                for item in content:
                    if not isinstance(item, dict) or item.get("type") != "audio":
                        continue
                    keys = [key for key in ("audio", "path", "url") if item.get(key) is not None]
                    if not keys:
                        raise AudioInputError(
                            'an {"type": "audio"} content item needs one of "audio", "path" or "url".'
                        )
                    waveforms.append(
                        self.load_audio(
                            item[keys[0]], sampling_rate=item.get("sampling_rate"), name=f"audio {len(waveforms)}"
                        )
                    )
        return waveforms

    # transformers (5.23, 5.24) loads the audio of chat items in this private hook of ProcessorMixin.apply_chat_template
    # and offers no public one. Its own version loads every audio item with transformers.audio_utils.load_audio, which
    # knows neither our loading policy, nor the "sampling_rate" key of an item, nor that assistant audio is history
    # text, and it fails on a tool result whose content is a dict. Handing it pre-loaded arrays from the public
    # apply_chat_template was tried and keeps that failure; re-implementing apply_chat_template(tokenize=True) would
    # copy transformers. So this one override hands the loading to the public audios_in_conversation and returns the
    # hook's (images, videos, audios, extra inputs) tuple. It is the only private ProcessorMixin method overridden here.
    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        empty = [[] for _ in conversations]
        return empty, empty, self.audios_in_conversation(list(conversations)), {}

    # ------------------------------------------------------------------ decoding
    def decode_text(self, token_ids, skip_special_tokens: bool = True) -> str | list[str]:
        """Decode generated text ids, stripping the control tokens around the reply (leading ``<|audio_bos|>`` /
        ``<|sil|>``, trailing ``<|audio_eos|>`` / ``<|sil|>`` / ``<|im_end|>``, any padding). A 2-D input gives a list."""
        from .detokenizer import clean_text_ids

        rows, batched = _as_rows(token_ids)
        leading = {self.audio_bos_token_id, self.text_sil_token_id}
        trailing = {self.audio_eos_token_id, self.text_sil_token_id, self.im_end_token_id}
        pad = {self.text_pad_token_id}
        texts = [
            self.tokenizer.decode(
                clean_text_ids(row, leading=leading, trailing=trailing, padding=pad),
                skip_special_tokens=skip_special_tokens,
            )
            for row in rows
        ]
        return texts if batched else texts[0]

    def decode_speech(self, speech_ids, speech_attention_mask=None, lengths=None) -> list[list[int]]:
        """Per-row lists of real speech codes (``0 <= code < num_speech_codes``) from generated speech ids (B, S) or
        one row (S,): positions past ``lengths[b]`` or masked out are ignored, then the rule of
        :func:`fun_audio_chat.speech_codes.real_speech_codes` applies (stop at the first speech EOS, drop
        speech-BOS delay ids, pad and every other non-code id)."""
        from ..speech_codes import SpeechCodeLayout, real_speech_codes

        rows = to_list(speech_ids)
        if not rows:
            return []
        masks = None if speech_attention_mask is None else to_list(speech_attention_mask)
        if not isinstance(rows[0], (list, tuple)):
            rows, masks = [rows], None if masks is None else [masks]
        lengths = None if lengths is None else to_list(lengths)
        layout = SpeechCodeLayout.from_processor(self)
        decoded = []
        for index, row in enumerate(rows):
            if lengths is not None:
                row = row[: int(lengths[index])]
            if masks is not None:
                row = [value for value, keep in zip(row, masks[index]) if keep]
            decoded.append(real_speech_codes(row, layout)[0])
        return decoded

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens: bool = True, generation_mode: str | None = None, **kwargs
    ) -> list:
        """What transformers' ``any-to-any`` pipeline calls on ``generate``'s output: one entry per row.

        ``generated_outputs`` is what ``generate`` returned: the ids (B, L), the tuple ``(sequences, speech_ids)``
        or a :class:`~fun_audio_chat.modeling.generation_fun_audio_chat.FunAudioChatGenerateOutput`.

        * ``generation_mode="text"`` (or ``None``): the decoded sequences (``tokenizer.batch_decode``; ``kwargs`` go
          to it), decoded the way the pipeline decodes the prompt so that it can cut the prompt off.
        * ``generation_mode="audio"``: float32 waveforms at ``processor.detokenizer.sampling_rate`` (24 kHz), the
          real speech codes of each row (:meth:`decode_speech`) rendered by :attr:`detokenizer`; a row without
          speech codes gives an empty array.
        """
        sequences, speech_ids, speech_attention_mask = _generated_parts(generated_outputs)
        if generation_mode in (None, "text"):
            rows, _ = _as_rows(sequences)
            return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        if generation_mode != "audio":
            raise ValueError(
                f"generation_mode={generation_mode!r} is not an output of Fun-Audio-Chat; use 'text' or 'audio'."
            )
        if speech_ids is None:
            raise ValueError(
                "generation_mode='audio' needs the speech ids generate() returns with speech on; call generate with "
                "generation_mode='audio' (the any-to-any pipeline does) and pass its whole output here."
            )
        detokenizer = self.detokenizer
        if detokenizer is None:
            raise ValueError(
                "Turning speech codes into audio needs a detokenizer: save one next to the model "
                "(detokenizer.save_pretrained(folder / 'token2wav')), or pass it in with "
                "FunAudioChatProcessor.from_pretrained(folder, detokenizer=fun_audio_chat.CosyVoice3Detokenizer"
                ".from_pretrained(...)) or processor.detokenizer = ... ."
            )
        waveforms = []
        for codes in self.decode_speech(speech_ids, speech_attention_mask):
            if not codes:
                waveforms.append(np.zeros(0, dtype=np.float32))
                continue
            with _no_grad():
                audio = detokenizer(codes)
            if hasattr(audio, "detach"):
                audio = audio.detach().float().cpu().numpy()
            waveforms.append(np.asarray(audio, dtype=np.float32).reshape(-1))
        return waveforms

    def parse_tool_calls(self, text_or_ids, strict: bool = False) -> list[dict]:
        """Tool calls in a generated reply (text or ids): ``[{"name": str, "arguments": dict}, ...]``.
        See :func:`fun_audio_chat.processing.tool_calling.parse_tool_calls`."""
        from .tool_calling import parse_tool_calls

        text = text_or_ids if isinstance(text_or_ids, str) else self.decode_text(text_or_ids)
        if isinstance(text, list):
            return [parse_tool_calls(t, strict=strict) for t in text]
        return parse_tool_calls(text, strict=strict)

    # ------------------------------------------------------------------ training
    def build_training_example(self, messages: list[dict], **kwargs) -> dict:
        """One training example (official SFT layout) from a conversation; see
        :func:`fun_audio_chat.processing.training_examples.build_training_example`."""
        return build_training_example(self, messages, **kwargs)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The official ``processor_config.json`` keys (+ our extra settings only when they differ from defaults).
        The feature extractor goes to its own ``preprocessor_config.json``, as in the released repository."""
        output = {key: getattr(self, key) for key in _OFFICIAL_CONFIG_KEYS}
        for key, default in _EXTRA_CONFIG_DEFAULTS.items():
            value = getattr(self, key)
            if key == "keep_chat_template":
                # Chosen by the user when it is not the built-in one: saved templates of that kind load as they are.
                value = self.chat_template is not None and not is_fun_audio_chat_template(self.chat_template)
            if value != default:
                output[key] = value
        output["processor_class"] = self.__class__.__name__
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write the official layout: transformers' own files (processor_config.json, the text tokenizer files,
        chat_template.jinja, speech_tokenizer/), then the release-layout files transformers 5 does not write
        (:func:`~fun_audio_chat.processing.release_layout.write_release_layout`: preprocessor_config.json, a
        special_tokens_map.json next to each tokenizer, vocab.json + merges.txt, the speech tokenizer's class name);
        and the detokenizer the processor holds (given, or found where it was loaded from) in token2wav/.

        With ``push_to_hub=True`` the folder is then uploaded by transformers' ``push_to_hub`` (``repo_id`` defaults
        to the folder's name; ``commit_message``, ``commit_description``, ``private``, ``token``, ``revision``,
        ``create_pr`` and ``tags`` are passed on), which saves through this method, so saving and pushing write the
        same files."""
        files = super().save_pretrained(save_directory)
        write_release_layout(self, save_directory)
        self._save_detokenizer(save_directory)
        if push_to_hub:
            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            push_arguments = (
                "commit_message",
                "commit_description",
                "private",
                "token",
                "revision",
                "create_pr",
                "tags",
            )
            self.push_to_hub(repo_id, **{key: kwargs[key] for key in push_arguments if key in kwargs})
        return files

    def _save_detokenizer(self, save_directory) -> None:
        """Save the detokenizer into ``token2wav/``, unless it would be loaded from that very folder (saving over
        its own source)."""
        source = self._detokenizer_source
        saving_over_its_source = source is not None and os.path.abspath(source[0]) == os.path.abspath(save_directory)
        if not saving_over_its_source and self.detokenizer is not None and hasattr(self.detokenizer, "save_pretrained"):
            self.detokenizer.save_pretrained(os.path.join(save_directory, DETOKENIZER_SUBFOLDER))


def _holds_detokenizer(source: str, loading: dict) -> bool:
    """Whether a folder or Hub repo has a ``token2wav/config.json`` (a Hub lookup, answered from the cache offline)."""
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, DETOKENIZER_SUBFOLDER, "config.json"))
    from transformers.utils import cached_file

    try:
        found = cached_file(
            source,
            "config.json",
            subfolder=DETOKENIZER_SUBFOLDER,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **loading,
        )
    except OSError:
        return False
    return found is not None


def _detokenizer_folder(source: str, loading: dict) -> str:
    """The local ``token2wav/`` folder of a folder or Hub repo (only that subfolder is downloaded)."""
    if os.path.isdir(source):
        return os.path.join(source, DETOKENIZER_SUBFOLDER)
    from huggingface_hub import snapshot_download

    hub = {key: value for key, value in loading.items() if key != "proxies"}
    root = snapshot_download(source, allow_patterns=[f"{DETOKENIZER_SUBFOLDER}/*"], **hub)
    return os.path.join(root, DETOKENIZER_SUBFOLDER)


def _count_code_tokens(speech_tokenizer) -> int:
    vocab = speech_tokenizer.get_vocab()
    return sum(1 for token in vocab if token.startswith("[AU") and token.endswith("]"))


def _is_speech_tokenizer(tokenizer) -> bool:
    try:
        return "[AU0000]" in tokenizer.get_vocab()
    except Exception:
        return False


def _generated_parts(generated_outputs) -> tuple[Any, Any, Any]:
    """``(sequences, speech_ids, speech_attention_mask)`` of any form ``generate`` returns (absent parts ``None``)."""
    if isinstance(generated_outputs, Mapping):  # a ModelOutput is a dict
        return tuple(generated_outputs.get(key) for key in ("sequences", "speech_ids", "speech_attention_mask"))
    if isinstance(generated_outputs, tuple):
        sequences, speech_ids = (*generated_outputs, None)[:2]
        return sequences, speech_ids, None
    return generated_outputs, None, None


def _no_grad():
    import torch

    return torch.inference_mode()


def _as_rows(token_ids) -> tuple[list[list[int]], bool]:
    token_ids = to_list(token_ids)
    if len(token_ids) > 0 and isinstance(token_ids[0], (list, tuple)):
        return [list(map(int, row)) for row in token_ids], True
    return [list(map(int, token_ids))], False


__all__ = ["DEFAULT_MAX_AUDIO_SECONDS", "FunAudioChatProcessor"]
