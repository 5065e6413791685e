"""Speaker embeddings: CosyVoice 3's CAM++ speaker encoder (``campplus.onnx``, shipped in every CosyVoice 3
checkpoint folder) run with ``onnxruntime``, and a tiny random stand-in with the same interface for demos and tests.

The encoder maps the mean-normalised Kaldi fbank of a 16 kHz clip (:func:`~.features.speaker_fbank`, shape
``(1, T, 80)``) to one 192-value embedding, as the official frontend does. The ONNX graph is run by onnxruntime
(a maintained runtime; no port of CAM++ is kept here) on CPU; its input and output are found by position, as the
official frontend finds them, so any encoder with that signature works.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .features import SPEAKER_FBANK_BINS, speaker_fbank

SPEAKER_ENCODER_FILE = "campplus.onnx"
SPEAKER_EMBEDDING_DIM = 192

_INSTALL_HINT = (
    "The speaker encoder (campplus.onnx) runs with the optional `onnxruntime` package: "
    'pip install "fun-audio-chat[voice-cloning]".'
)


class OnnxSpeakerEncoder:
    """An ONNX speaker encoder (CosyVoice 3's ``campplus.onnx``): 16 kHz waveform → (192,) float32 embedding.

    Args:
        path: the ``.onnx`` file, or a CosyVoice 3 folder holding ``campplus.onnx``.
        threads: onnxruntime intra-op threads (the official frontend uses 1).
    """

    def __init__(self, path: str | os.PathLike | bytes, threads: int = 1):
        if isinstance(path, (bytes, bytearray)):  # a serialized model held in memory (the tiny built-in one)
            source, self.path = bytes(path), "<in-memory speaker encoder>"
        else:
            path = Path(path).expanduser()
            if path.is_dir():
                path = path / SPEAKER_ENCODER_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: speaker encoder not found; pass the campplus.onnx of a CosyVoice 3 checkpoint folder."
                )
            source, self.path = str(path), path
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError(_INSTALL_HINT) from err
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
        try:
            self.session = onnxruntime.InferenceSession(
                source, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime's own errors: an unreadable or non-ONNX file
            raise ValueError(f"{self.path}: not a usable ONNX speaker encoder: {err}") from err
        self._input_name = self.session.get_inputs()[0].name

    def embed_fbank(self, fbank: np.ndarray) -> torch.Tensor:
        """(T, 80) mean-normalised fbank → (192,) embedding."""
        features = np.ascontiguousarray(fbank, dtype=np.float32)[None]
        output = np.asarray(self.session.run(None, {self._input_name: features})[0], dtype=np.float32).reshape(-1)
        if output.size != SPEAKER_EMBEDDING_DIM:
            raise ValueError(
                f"{self.path}: the speaker encoder gave {output.size} values, CosyVoice 3 expects a "
                f"{SPEAKER_EMBEDDING_DIM}-value CAM++ embedding; pass the campplus.onnx of a CosyVoice 3 checkpoint."
            )
        return torch.from_numpy(output.copy())

    def __call__(self, waveform_16k: np.ndarray) -> torch.Tensor:
        """A mono 16 kHz waveform → its (192,) speaker embedding."""
        return self.embed_fbank(speaker_fbank(waveform_16k))


def tiny_speaker_encoder_model(seed: int = 0, hidden: int = 32) -> bytes:
    """A tiny random speaker encoder with CAM++'s interface (``(1, T, 80)`` fbank → ``(1, 192)``) as serialized
    ONNX: a frame-wise projection + ReLU, mean over time, a projection to 192 values. Built with ``onnx.helper`` (no
    exporter, no download); its embeddings are meaningless but depend on the clip. Save the bytes as a ``.onnx``
    file or pass them to :class:`OnnxSpeakerEncoder` directly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(seed)
    frame_weight = generator.standard_normal((SPEAKER_FBANK_BINS, hidden)) / np.sqrt(SPEAKER_FBANK_BINS)
    output_weight = generator.standard_normal((hidden, SPEAKER_EMBEDDING_DIM)) / np.sqrt(hidden)
    output_bias = 0.1 * generator.standard_normal(SPEAKER_EMBEDDING_DIM)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["fbank", "frame_weight"], ["frames"]),
            helper.make_node("Relu", ["frames"], ["activated"]),
            helper.make_node("ReduceMean", ["activated", "time_axis"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "output_weight"], ["projected"]),
            helper.make_node("Add", ["projected", "output_bias"], ["embedding"]),
        ],
        "tiny_speaker_encoder",
        [helper.make_tensor_value_info("fbank", TensorProto.FLOAT, [1, "frames", SPEAKER_FBANK_BINS])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, SPEAKER_EMBEDDING_DIM])],
        initializer=[
            numpy_helper.from_array(frame_weight.astype(np.float32), "frame_weight"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "time_axis"),
            numpy_helper.from_array(output_weight.astype(np.float32), "output_weight"),
            numpy_helper.from_array(output_bias.astype(np.float32), "output_bias"),
        ],
    )
    # opset 18 (ReduceMean takes its axes as an input); IR version 8 keeps it readable by older onnxruntime releases
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


__all__ = [
    "SPEAKER_EMBEDDING_DIM",
    "SPEAKER_ENCODER_FILE",
    "OnnxSpeakerEncoder",
    "tiny_speaker_encoder_model",
]
