"""Reading CosyVoice 3 checkpoints: the official folder (yaml + flow.pt + hift.pt), our converted folder
(config.json + model.safetensors) or a Hub repository holding either.

The official yaml is HyperPyYAML: its tags are constructor calls (``!new:module.Class``), function calls
(``!apply:``) and references (``!ref <key>``). Here it is parsed as **data** with a safe loader that turns every
tag into an inert :class:`Tagged` node; only the ``flow:`` and ``hift:`` sections are then interpreted, by the
known CosyVoice 3 class names and their arguments, into a :class:`CosyVoice3Config`. Any other class, tag or
argument there is refused. Weights are read with ``torch.load(weights_only=True)`` (tensors only, no pickled code).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .configuration_cosyvoice3 import CosyVoice3Config, CosyVoice3FlowConfig, CosyVoice3HiFTConfig

OFFICIAL_YAML_NAMES = ("cosyvoice3.yaml", "cosyvoice.yaml", "config.yaml")
CONVERTED_CONFIG = "config.json"
CONVERTED_WEIGHTS = "model.safetensors"
SPEAKER_FILE = "speaker_embedding.safetensors"


class CheckpointFormatError(ValueError):
    """The checkpoint folder or its yaml is not a CosyVoice 3 token-to-waveform model we can read."""


# --------------------------------------------------------------------------------------------------- yaml as data
@dataclass
class Tagged:
    """A yaml node carrying a tag such as ``!new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT``; never executed."""

    tag: str
    value: Any


def _safe_loader():
    import yaml

    class InertTagLoader(yaml.SafeLoader):
        pass

    def construct_tagged(loader, tag_suffix, node):
        tag = node.tag
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return Tagged(tag, value)

    InertTagLoader.add_multi_constructor("!", construct_tagged)
    InertTagLoader.add_multi_constructor("tag:", construct_tagged)
    return InertTagLoader


def read_yaml_as_data(text: str) -> dict:
    import yaml

    data = yaml.load(text, Loader=_safe_loader())
    if not isinstance(data, dict):
        raise CheckpointFormatError("the CosyVoice yaml should be a mapping with flow: and hift: sections.")
    return data


_REF_TOKEN = re.compile(r"\s*(?:(<[A-Za-z_][A-Za-z0-9_.\[\]]*>)|(\d+\.\d*|\.\d+|\d+(?:[eE][-+]?\d+)?)|([-+*/()]))")


def _evaluate_reference(expression: str, top: dict, seen: tuple = ()) -> Any:
    """``!ref <key>`` or simple arithmetic over references and numbers (+ - * / and parentheses), no eval."""
    tokens, position = [], 0
    expression = expression.strip()
    while position < len(expression):
        match = _REF_TOKEN.match(expression, position)
        if not match or match.end() == position:
            raise CheckpointFormatError(
                f"!ref {expression!r}: only <key> references, numbers and + - * / ( ) are understood."
            )
        tokens.append(match.groups())
        position = match.end()

    def value_of(name: str):
        key = name[1:-1]
        if key in seen:
            raise CheckpointFormatError(f"!ref <{key}> refers to itself.")
        if key not in top:
            raise CheckpointFormatError(f"!ref <{key}>: no top-level key {key!r} in the yaml.")
        return _resolve(top[key], top, seen + (key,))

    def parse_sum(i):
        value, i = parse_product(i)
        while i < len(tokens) and tokens[i][2] in ("+", "-"):
            right, j = parse_product(i + 1)
            value = value + right if tokens[i][2] == "+" else value - right
            i = j
        return value, i

    def parse_product(i):
        value, i = parse_atom(i)
        while i < len(tokens) and tokens[i][2] in ("*", "/"):
            right, j = parse_atom(i + 1)
            value = value * right if tokens[i][2] == "*" else value / right
            i = j
        return value, i

    def parse_atom(i):
        if i >= len(tokens):
            raise CheckpointFormatError(f"!ref {expression!r} ends early.")
        ref, number, op = tokens[i]
        if ref:
            return value_of(ref), i + 1
        if number:
            return (float(number) if any(c in number for c in ".eE") else int(number)), i + 1
        if op == "(":
            value, j = parse_sum(i + 1)
            if j >= len(tokens) or tokens[j][2] != ")":
                raise CheckpointFormatError(f"!ref {expression!r}: unbalanced parentheses.")
            return value, j + 1
        if op == "-":
            value, j = parse_atom(i + 1)
            return -value, j
        raise CheckpointFormatError(f"!ref {expression!r}: unexpected {op!r}.")

    value, end = parse_sum(0)
    if end != len(tokens):
        raise CheckpointFormatError(f"!ref {expression!r}: trailing tokens.")
    return value


def _resolve(value, top: dict, seen: tuple = ()):
    """Resolve references inside plain data; constructor tags stay as :class:`Tagged` for the interpreter."""
    if isinstance(value, Tagged):
        if value.tag == "!ref":
            return _evaluate_reference(str(value.value), top, seen)
        if value.tag.startswith("!new:"):
            return Tagged(value.tag, _resolve(value.value, top, seen))
        raise CheckpointFormatError(
            f"yaml tag {value.tag} is not allowed in the flow/hift sections (only !new: with a known CosyVoice 3 "
            "class and !ref are interpreted; nothing is ever executed)."
        )
    if isinstance(value, dict):
        return {k: _resolve(v, top, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, seen) for v in value]
    return value


# The CosyVoice 3 classes we know, with the arguments they may carry. ``ignored`` arguments only matter for
# training; ``fixed`` ones must have the value our implementation assumes.
_FLOW = "cosyvoice.flow.flow.CausalMaskedDiffWithDiT"
_PRE_LOOKAHEAD = "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer"
_CFM = "cosyvoice.flow.flow_matching.CausalConditionalCFM"
_DIT = "cosyvoice.flow.DiT.dit.DiT"
_DICTCONFIG = "omegaconf.DictConfig"
_HIFT = "cosyvoice.hifigan.generator.CausalHiFTGenerator"
_F0 = "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor"
KNOWN_CLASSES = (_FLOW, _PRE_LOOKAHEAD, _CFM, _DIT, _DICTCONFIG, _HIFT, _F0)


def _constructor(node, expected: str, where: str) -> dict:
    if not isinstance(node, Tagged) or not node.tag.startswith("!new:"):
        raise CheckpointFormatError(f"{where}: expected !new:{expected}, found {node!r:.80}.")
    name = node.tag[len("!new:") :]
    if name != expected:
        known = ", ".join(KNOWN_CLASSES)
        raise CheckpointFormatError(
            f"{where}: class {name} is not a known CosyVoice 3 {where} class (expected {expected}; known: {known})."
        )
    if not isinstance(node.value, dict):
        raise CheckpointFormatError(f"{where}: arguments of {name} must be a mapping.")
    return node.value


def _take(args: dict, where: str, mapping: dict, ignored: tuple = (), fixed: dict | None = None) -> dict:
    fixed = fixed or {}
    unknown = set(args) - set(mapping) - set(ignored) - set(fixed)
    if unknown:
        raise CheckpointFormatError(
            f"{where}: unknown argument(s) {sorted(unknown)}; this reader understands "
            f"{sorted(set(mapping) | set(ignored) | set(fixed))}."
        )
    for key, expected in fixed.items():
        if key in args and args[key] != expected:
            raise CheckpointFormatError(f"{where}: {key}={args[key]!r} is not supported (only {expected!r}).")
    return {ours: args[theirs] for theirs, ours in mapping.items() if theirs in args}


# official argument name -> our config field, per CosyVoice 3 class
_FLOW_ARGUMENTS = {
    "input_size": "mel_bins",
    "spk_embed_dim": "speaker_embedding_dim",
    "vocab_size": "vocab_size",
    "token_mel_ratio": "token_mel_ratio",
    "pre_lookahead_len": "pre_lookahead_tokens",
}
_DIT_ARGUMENTS = {
    "dim": "hidden_size",
    "depth": "num_layers",
    "heads": "num_heads",
    "dim_head": "head_dim",
    "ff_mult": "ff_mult",
    "static_chunk_size": "chunk_frames",
}
_HIFT_ARGUMENTS = {
    "in_channels": "mel_bins",
    "base_channels": "base_channels",
    "nb_harmonics": "num_harmonics",
    "sampling_rate": "sample_rate",
    "nsf_alpha": "sine_amplitude",
    "nsf_sigma": "noise_std",
    "nsf_voiced_threshold": "voiced_threshold",
    "upsample_rates": "upsample_rates",
    "upsample_kernel_sizes": "upsample_kernel_sizes",
    "resblock_kernel_sizes": "resblock_kernel_sizes",
    "resblock_dilation_sizes": "resblock_dilations",
    "source_resblock_kernel_sizes": "source_resblock_kernel_sizes",
    "source_resblock_dilation_sizes": "source_resblock_dilations",
    "lrelu_slope": "lrelu_slope",
    "audio_limit": "audio_limit",
    "conv_pre_look_right": "conv_pre_lookahead",
}
_HIFT_FLOAT_FIELDS = ("sine_amplitude", "noise_std", "voiced_threshold", "lrelu_slope", "audio_limit")


def config_from_official_yaml(text: str) -> CosyVoice3Config:
    """Interpret the flow and hift sections of an official CosyVoice 3 yaml (as data) into our config."""
    top = read_yaml_as_data(text)
    for section in ("flow", "hift"):
        if section not in top:
            raise CheckpointFormatError(f"the yaml has no {section}: section (is this a CosyVoice 3 model folder?).")
    return CosyVoice3Config(
        flow=_flow_config(_resolve(top["flow"], top)), hift=_hift_config(_resolve(top["hift"], top))
    )


def _flow_config(node) -> CosyVoice3FlowConfig:
    """The flow section: the flow's own arguments, its pre-lookahead layer and its decoder (CFM + DiT)."""
    flow = _constructor(node, _FLOW, "flow")
    values = _take(
        flow,
        "flow",
        _FLOW_ARGUMENTS,
        ignored=("input_frame_rate", "only_mask_loss", "pre_lookahead_layer", "decoder", "output_size"),
        fixed={"output_type": "mel"},
    )
    if "output_size" in flow and "input_size" in flow and flow["output_size"] != flow["input_size"]:
        raise CheckpointFormatError("flow: output_size must equal input_size (the mel bins).")
    pre = _take(
        _constructor(flow.get("pre_lookahead_layer"), _PRE_LOOKAHEAD, "flow.pre_lookahead_layer"),
        "flow.pre_lookahead_layer",
        {"channels": "pre_lookahead_channels"},
        ignored=("in_channels", "pre_lookahead_len"),
    )
    flow_values = {**values, **pre, **_flow_decoder_values(flow.get("decoder"))}
    # yaml numbers arrive as whatever the literal or the !ref arithmetic gave (2 vs 2.0): the config is typed
    if "cfg_rate" in flow_values:
        flow_values["cfg_rate"] = float(flow_values["cfg_rate"])
    if "chunk_frames" in flow_values:
        flow_values["chunk_frames"] = int(flow_values["chunk_frames"])
    return CosyVoice3FlowConfig(**flow_values)


def _flow_decoder_values(node) -> dict:
    """The flow's decoder: the flow-matching solver settings (``cfm_params``) and the DiT estimator's sizes."""
    decoder = _constructor(node, _CFM, "flow.decoder")
    _take(decoder, "flow.decoder", {}, ignored=("in_channels", "n_spks", "spk_emb_dim", "cfm_params", "estimator"))
    cfm = {}
    if decoder.get("cfm_params") is not None:
        content = _constructor(decoder["cfm_params"], _DICTCONFIG, "flow.decoder.cfm_params").get("content", {})
        cfm = _take(
            content,
            "flow.decoder.cfm_params",
            {"inference_cfg_rate": "cfg_rate"},
            ignored=("sigma_min", "training_cfg_rate", "reg_loss_type"),
            fixed={"solver": "euler", "t_scheduler": "cosine"},
        )
    dit = _take(
        _constructor(decoder.get("estimator"), _DIT, "flow.decoder.estimator"),
        "flow.decoder.estimator",
        _DIT_ARGUMENTS,
        ignored=("mel_dim", "mu_dim", "spk_dim", "out_channels", "dropout"),
        fixed={"num_decoding_left_chunks": -1},
    )
    return {**dit, **cfm}


def _hift_config(node) -> CosyVoice3HiFTConfig:
    """The hift section: the vocoder's arguments, its iSTFT sizes and its F0 predictor."""
    hift = _constructor(node, _HIFT, "hift")
    istft = hift.get("istft_params", {})
    values = _take(hift, "hift", _HIFT_ARGUMENTS, ignored=("istft_params", "f0_predictor"))
    if set(istft) - {"n_fft", "hop_len"}:
        raise CheckpointFormatError(f"hift.istft_params: unknown keys {sorted(set(istft) - {'n_fft', 'hop_len'})}.")
    f0 = _take(
        _constructor(hift.get("f0_predictor"), _F0, "hift.f0_predictor"),
        "hift.f0_predictor",
        {"cond_channels": "f0_channels"},
        ignored=("in_channels",),
        fixed={"num_class": 1},
    )
    for name in _HIFT_FLOAT_FIELDS:
        if name in values:
            values[name] = float(values[name])
    return CosyVoice3HiFTConfig(
        **values, **f0, n_fft=int(istft.get("n_fft", 16)), hop_length=int(istft.get("hop_len", 4))
    )


# ------------------------------------------------------------------------------------------------ state dicts
# Official key → our key, applied in order (regular expressions).
_FLOW_RENAMES = [
    (r"^input_embedding\.", "token_embedding."),
    (r"^spk_embed_affine_layer\.", "speaker_projection."),
    (r"^pre_lookahead_layer\.conv1\.", "pre_lookahead.lookahead_conv."),
    (r"^pre_lookahead_layer\.conv2\.", "pre_lookahead.causal_conv."),
    (r"^decoder\.estimator\.", "estimator."),
    (r"^estimator\.time_embed\.time_mlp\.0\.", "estimator.time_embedding.linear_in."),
    (r"^estimator\.time_embed\.time_mlp\.2\.", "estimator.time_embedding.linear_out."),
    (r"^estimator\.input_embed\.proj\.", "estimator.input_projection."),
    (r"^estimator\.input_embed\.conv_pos_embed\.conv1\.0\.", "estimator.position_convs.0."),
    (r"^estimator\.input_embed\.conv_pos_embed\.conv2\.0\.", "estimator.position_convs.1."),
    (r"^estimator\.rotary_embed\.inv_freq$", "estimator.rotary_inv_freq"),
    (r"^estimator\.transformer_blocks\.(\d+)\.attn_norm\.linear\.", r"estimator.blocks.\1.modulation."),
    (r"^estimator\.transformer_blocks\.(\d+)\.attn\.to_q\.", r"estimator.blocks.\1.attention.q_proj."),
    (r"^estimator\.transformer_blocks\.(\d+)\.attn\.to_k\.", r"estimator.blocks.\1.attention.k_proj."),
    (r"^estimator\.transformer_blocks\.(\d+)\.attn\.to_v\.", r"estimator.blocks.\1.attention.v_proj."),
    (r"^estimator\.transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"estimator.blocks.\1.attention.o_proj."),
    (r"^estimator\.transformer_blocks\.(\d+)\.ff\.ff\.0\.0\.", r"estimator.blocks.\1.feed_forward.up_proj."),
    (r"^estimator\.transformer_blocks\.(\d+)\.ff\.ff\.2\.", r"estimator.blocks.\1.feed_forward.down_proj."),
    (r"^estimator\.norm_out\.linear\.", "estimator.final_modulation."),
    (r"^estimator\.proj_out\.", "estimator.output_projection."),
]
_HIFT_RENAMES = [
    (r"^generator\.", ""),
    (r"^m_source\.l_linear\.", "source.merge."),
    (r"^ups\.", "upsample_convs."),
    (r"^source_downs\.", "source_downsamples."),
    (r"\.weight_g$", ".parametrizations.weight.original0"),
    (r"\.weight_v$", ".parametrizations.weight.original1"),
]


def _f0_rename(key: str) -> str:
    match = re.match(r"^f0_predictor\.condnet\.(\d+)\.(.*)$", key)
    if match:
        index = int(match.group(1))
        if index % 2:
            raise CheckpointFormatError(f"unexpected F0 predictor key {key} (activations hold no weights).")
        return f"f0_predictor.convs.{index // 2}.{match.group(2)}"
    return key


def official_flow_key(key: str) -> str:
    for pattern, replacement in _FLOW_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def official_hift_key(key: str) -> str:
    for pattern, replacement in _HIFT_RENAMES:
        key = re.sub(pattern, replacement, key)
    return _f0_rename(key)


def load_official_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickler refusal or a corrupt file
        raise CheckpointFormatError(f"{path}: not a plain tensor state dict ({type(err).__name__}: {err}).") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{path}: expected a dict of tensors (a module state_dict).")
    return state


def official_state_dict(flow_state: dict, hift_state: dict) -> dict[str, torch.Tensor]:
    """Official flow.pt / hift.pt state dicts → our detokenizer's state dict keys (``flow.*``, ``hift.*``)."""
    state = {}
    for key, value in flow_state.items():
        state["flow." + official_flow_key(key)] = value
    for key, value in hift_state.items():
        state["hift." + official_hift_key(key)] = value
    return state


# ------------------------------------------------------------------------------------------------ folders / Hub
def _find_official_yaml(folder: Path) -> Path | None:
    for name in OFFICIAL_YAML_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> tuple[str, Path]:
    """('converted' | 'official', local folder). A Hub id is fetched file by file (only what is needed)."""
    path = Path(os.fspath(name_or_path))
    if path.is_dir() and hub_kwargs.get("subfolder"):
        # transformers' convention: the files live in <path>/<subfolder>, for local folders as for Hub repos
        path = path / hub_kwargs["subfolder"]
        if not path.is_dir():
            raise CheckpointFormatError(f"{path}: no such folder (from subfolder={hub_kwargs['subfolder']!r}).")
    if path.is_dir():
        if (path / CONVERTED_CONFIG).is_file() and (path / CONVERTED_WEIGHTS).is_file():
            return "converted", path
        if (path / "flow.pt").is_file() and (path / "hift.pt").is_file() and _find_official_yaml(path):
            return "official", path
        raise CheckpointFormatError(
            f"{path}: neither a converted detokenizer ({CONVERTED_CONFIG} + {CONVERTED_WEIGHTS}) nor an official "
            f"CosyVoice 3 folder ({' or '.join(OFFICIAL_YAML_NAMES)} + flow.pt + hift.pt)."
        )
    if path.exists() or str(name_or_path).count("/") != 1:
        raise CheckpointFormatError(f"{name_or_path}: no such folder (and not a Hub id of the form owner/name).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = str(name_or_path)

    def fetch(filename):
        return Path(hf_hub_download(repo, filename, revision=revision, **hub_kwargs))

    try:
        config = fetch(CONVERTED_CONFIG)
        fetch(CONVERTED_WEIGHTS)
        try:
            fetch(SPEAKER_FILE)
        except EntryNotFoundError:
            pass
        return "converted", config.parent
    except EntryNotFoundError:
        pass
    for name in OFFICIAL_YAML_NAMES:
        try:
            yaml_path = fetch(name)
            break
        except EntryNotFoundError:
            continue
    else:
        raise CheckpointFormatError(f"Hub repo {repo} has neither {CONVERTED_CONFIG} nor a CosyVoice 3 yaml.")
    fetch("flow.pt")
    fetch("hift.pt")
    return "official", yaml_path.parent
