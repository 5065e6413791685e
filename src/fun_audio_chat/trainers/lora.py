"""LoRA presets for Fun-Audio-Chat (PEFT).

The LLM and the Speech Refined Head's inner Qwen3 use the same projection names (``q_proj`` ... ``down_proj``),
and the Whisper-style encoder has ``q_proj``/``k_proj``/``v_proj`` too, so a plain list of names would adapt
all three. :func:`fun_audio_chat_lora_config` therefore builds an anchored regex (PEFT full-matches a string
``target_modules`` against module names) scoped to the LLM, the SRH, or both::

    from peft import get_peft_model
    from fun_audio_chat.trainers import fun_audio_chat_lora_config

    model = get_peft_model(model, fun_audio_chat_lora_config("llm", r=16))
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("adapter")            # adapters (+ modules_to_save) only
    merged = model.merge_and_unload()           # a plain FunAudioChatForConditionalGeneration again

``generate()`` works on the PEFT model (it forwards to the wrapped model). Under FSDP2 or DeepSpeed ZeRO-2/3, wrap
the model with PEFT first and build the arguments from the PEFT model; ``Trainer.save_model`` then writes the adapter
gathered from all processes (``docs/distributed.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from peft import LoraConfig

#: Module-name prefixes of the two Qwen3 stacks (as named inside FunAudioChatForConditionalGeneration).
LLM_LAYERS_PREFIX = r"language_model\.model\.layers"
SRH_LAYERS_PREFIX = r"audio_invert_tower\.crq_transformer\.layers"

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

#: Small SRH layers around its Qwen3 that map LLM states in and out; trained in full with an SRH adapter.
SRH_MODULES_TO_SAVE = (
    "audio_invert_tower.pre_matching",
    "audio_invert_tower.input_matching",
    "audio_invert_tower.output_matching",
)
#: Audio-to-LLM adapters (encoder projection and the discrete-encoder matching layers).
AUDIO_ADAPTER_MODULES = (
    "continuous_audio_tower.proj",
    "audio_tower.output_matching",
    "audio_tower.continual_output_matching",
)

_SCOPES = {"llm": (LLM_LAYERS_PREFIX,), "srh": (SRH_LAYERS_PREFIX,), "both": (LLM_LAYERS_PREFIX, SRH_LAYERS_PREFIX)}


def lora_target_regex(
    scope: str = "llm",
    projections: Sequence[str] = ALL_PROJECTIONS,
    layers: Iterable[int] | None = None,
) -> str:
    """Anchored regex over module names selecting the Qwen3 projections of ``scope`` ("llm", "srh", "both").

    ``projections`` are short names (``"q"``, ``"gate"`` ...) or full ones (``"q_proj"``); ``layers``
    restricts to some layer indices.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {sorted(_SCOPES)}, got {scope!r}")
    short = []
    for p in projections:
        p = p[: -len("_proj")] if p.endswith("_proj") else p
        if p not in ALL_PROJECTIONS:
            raise ValueError(f"unknown projection {p!r}; choose from {ALL_PROJECTIONS}")
        short.append(p)
    attn = [p for p in short if p in ATTENTION_PROJECTIONS]
    mlp = [p for p in short if p in MLP_PROJECTIONS]
    leaves = []
    if attn:
        leaves.append(r"self_attn\.(?:" + "|".join(attn) + r")_proj")
    if mlp:
        leaves.append(r"mlp\.(?:" + "|".join(mlp) + r")_proj")
    if not leaves:
        raise ValueError("projections is empty")
    layer_pat = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in sorted(set(layers))) + ")"
    prefixes = "|".join(_SCOPES[scope])
    return rf"(?:{prefixes})\.{layer_pat}\.(?:{'|'.join(leaves)})"


def fun_audio_chat_lora_config(
    scope: str = "llm",
    r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    projections: Sequence[str] = ALL_PROJECTIONS,
    layers: Iterable[int] | None = None,
    modules_to_save: Sequence[str] | None | str = "auto",
    train_audio_adapters: bool = False,
    **lora_kwargs,
) -> LoraConfig:
    """A ``peft.LoraConfig`` for Fun-Audio-Chat, scoped to the LLM, the SRH or both.

    Args:
        scope: ``"llm"`` (the Qwen3 LLM's decoder layers), ``"srh"`` (the Speech Refined Head's Qwen3 layers) or
            ``"both"``. The audio encoder's own ``q_proj``/``k_proj``/``v_proj`` are never targeted.
        r / lora_alpha / lora_dropout: LoRA rank, scaling (default ``2 * r``) and dropout.
        projections: which of ``q k v o gate up down`` to adapt (default: all seven).
        layers: only these layer indices (default: all).
        modules_to_save: extra modules trained in full and saved with the adapter. ``"auto"``: the SRH's small
            in/out matching layers when the SRH is in scope (``SRH_MODULES_TO_SAVE``), nothing for the LLM alone
            (so the adapter stays small). ``None``/``[]`` for none, or a list of module names.
        train_audio_adapters: also train the audio-to-LLM adapter layers in full (``AUDIO_ADAPTER_MODULES``).
        **lora_kwargs: passed to ``LoraConfig`` (``use_rslora``, ``init_lora_weights``, ``bias`` ...).

    ``task_type`` is left unset on purpose: the model's inputs (speech, features) are not a causal LM's, and
    a plain ``PeftModel`` forwards ``forward``/``generate`` unchanged.
    """
    target = lora_target_regex(scope, projections, layers)
    if modules_to_save == "auto":
        to_save = list(SRH_MODULES_TO_SAVE) if scope in ("srh", "both") else []
    elif modules_to_save is None:
        to_save = []
    else:
        to_save = list(modules_to_save)
    if train_audio_adapters:
        to_save += [m for m in AUDIO_ADAPTER_MODULES if m not in to_save]
    for name in to_save:
        if re.fullmatch(target, name):
            raise ValueError(f"{name!r} is both a LoRA target and in modules_to_save")
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target,
        modules_to_save=to_save or None,
        **lora_kwargs,
    )


__all__ = [
    "ALL_PROJECTIONS",
    "AUDIO_ADAPTER_MODULES",
    "SRH_MODULES_TO_SAVE",
    "fun_audio_chat_lora_config",
    "lora_target_regex",
]
