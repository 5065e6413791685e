"""The one place where fun_audio_chat reaches into transformers, accelerate, TRL or PEFT beyond their public API, or
depends on how their supported releases differ.

Supported releases (each workaround below is tested on both ends by ``tests/test_framework_compat.py``, which fails
when a release moves what it relies on):

================  ===========  ================================================================================
library           versions     workarounds in this module
================  ===========  ================================================================================
transformers      5.23 - 5.25  the cache's name (5.24 rename); ``Trainer``'s input preparation and dataset
                               column hook; ``TrainingArguments``' JSON-dict fields; ``PreTrainedModel``'s layer
                               and checkpoint-key class attributes; compiled decoding off GPU; generate()'s
                               preparation steps run outside generate() (continuous batching); the generation
                               config's "derived from the model config" mark
accelerate        1.15 - 1.16  whether the process state exists; resetting the shared state between two Trainers
                               of one process; FSDP2 on CPU processes
TRL               1.16         ``DPOTrainer``'s private extension points (dataset preparation, reference
                               precomputation, loss, model-card tags), its metric store and token count; the
                               instance ``forward`` its fused LM head installs
PEFT              0.21         none (only public API is used)
================  ===========  ================================================================================

Everything else in the package uses public names only; ``tests/test_import_graph.py`` checks (by reading the source)
that no other module touches a ``_private`` attribute of these libraries' objects or overrides their private methods.
Subclasses use the mixins below (:class:`TrainerPrivateHooks`, :class:`DPOTrainerPrivateHooks`) and implement the
public, named hooks they forward to.

Importing this module imports only ``transformers.modeling_outputs`` (the model code uses the cache names); the
training workarounds import accelerate and TRL when called.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

# ================================================================================================================
# transformers: the key/value cache's name (a release difference, no private reach)
#
# transformers 5.24 renamed the key/value cache from ``past_key_values`` to ``cache``: model outputs declare a
# ``cache`` field (``output.past_key_values`` stays readable as a deprecated alias until 5.40, but constructing an
# output with ``past_key_values=`` fails for subclasses), model ``forward`` methods take ``cache=``, and
# ``generate()`` keeps it under ``model_kwargs["cache"]``. Releases up to 5.23 use ``past_key_values`` everywhere.
# Code elsewhere never spells either name when it builds outputs or passes a cache on: it uses :data:`CACHE_NAME`,
# and it reads a cache with :func:`cache_of`.

#: The keyword under which this transformers release passes and returns the key/value cache.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
#: The other spelling, accepted from callers for compatibility.
LEGACY_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


def cache_of(container: Any) -> Any:
    """The cache held by a model output or a ``model_kwargs`` dict, whatever the release calls it."""
    if isinstance(container, dict):
        found = container.get(CACHE_NAME)
        return found if found is not None else container.get(LEGACY_CACHE_NAME)
    return getattr(container, CACHE_NAME, None)


def pop_cache_argument(explicit: Any, kwargs: dict) -> Any:
    """The cache a ``forward`` caller gave, under either name (removed from ``kwargs``); both at once is an error."""
    other = kwargs.pop("cache", None)
    if explicit is not None and other is not None and explicit is not other:
        raise ValueError("Pass the key/value cache once, as `cache` or `past_key_values`, not both.")
    return explicit if explicit is not None else other


# ================================================================================================================
# transformers: PreTrainedModel class attributes and Trainer / TrainingArguments internals


def layer_classes_not_to_split(model: Any) -> list[str]:
    """``model._no_split_modules``: the layer classes that must stay whole (transformers' device-map and FSDP wrap
    information, a class attribute every ``PreTrainedModel`` declares; no public accessor exists)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def checkpoint_keys_to_ignore(model: Any) -> list[str]:
    """``model._keys_to_ignore_on_load_unexpected``: regexes of checkpoint keys ``from_pretrained`` skips without a
    warning (a ``PreTrainedModel`` class attribute; no public accessor exists)."""
    return list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])


def compile_on_every_device(compile_config: Any) -> Any:
    """Let ``generate()`` compile decode steps off GPU too: transformers compiles them on CPU only when the
    ``CompileConfig``'s ``_compile_all_devices`` is set, which its constructor does not take. Returns the config."""
    compile_config._compile_all_devices = True
    return compile_config


def keep_extra_generation_fields(generation_config: Any) -> Any:
    """Clear a ``GenerationConfig``'s private "derived from the model config" mark (``_from_model_config``, set by
    ``GenerationConfig.from_model_config``): while it is set, the fields transformers does not define (ours: the
    speech controls) are not kept when the config is rebuilt from a dict (``GenerationConfig.__init__`` skips extra
    keyword arguments for such configs), and nothing public clears it. Returns the config."""
    generation_config._from_model_config = False
    return generation_config


@dataclass
class PreparedGeneration:
    """What ``generate()`` derives from its settings before decoding, for one prompt."""

    config: Any  # the merged GenerationConfig, lengths resolved against the prompt
    logits_processor: Any  # LogitsProcessorList
    stopping_criteria: Any  # StoppingCriteriaList
    eos_token_ids: set[int]


def prepare_generation_outside_generate(
    model: Any,
    input_ids: Any,
    model_kwargs: dict,
    generation_config: Any = None,
    settings: dict | None = None,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
) -> PreparedGeneration:
    """Run ``generate()``'s own preparation steps (``GenerationMixin._prepare_generation_config``,
    ``_prepare_special_tokens``, ``_prepare_generated_length``, ``_get_logits_processor``, ``_get_stopping_criteria``)
    for one prompt (batch 1) that will be decoded outside ``generate()``, as the continuous-batching decoder does for
    a row joining a running batch, so a row's settings mean exactly what they mean to ``generate()``. transformers has
    no public entry point for these steps (its own continuous batching keeps its own). Unknown ``settings`` raise.
    """
    settings = dict(settings or {})
    has_default_max_length = (
        settings.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        settings.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    config, unused = model._prepare_generation_config(generation_config, **settings)
    if unused:
        raise ValueError(f"{sorted(unused)} are not generation settings.")
    prompt_length = input_ids.shape[1]
    model._prepare_special_tokens(config, True, device=input_ids.device, batch_size=1)
    config = model._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=prompt_length,
        inputs_tensor=input_ids,
    )
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=input_ids,
        logits_processor=logits_processor,
        device=input_ids.device,
        model_kwargs=model_kwargs,
    )
    criteria = model._get_stopping_criteria(generation_config=config, stopping_criteria=stopping_criteria)
    eos = config._eos_token_tensor  # set by _prepare_special_tokens
    eos_token_ids = set() if eos is None else {int(token) for token in eos.flatten().tolist()}
    return PreparedGeneration(config, processors, criteria, eos_token_ids)


def prepare_trainer_inputs(trainer: Any, inputs: MutableMapping) -> MutableMapping:
    """``Trainer._prepare_inputs``: a batch moved to the trainer's device, as ``training_step`` prepares it (needed by
    a ``prediction_step`` override that runs the loss itself; ``Trainer`` has no public equivalent)."""
    return trainer._prepare_inputs(inputs)


def dict_fields_parsed_from_json(*fields: str):
    """Class decorator for a ``TrainingArguments`` subclass: its ``fields`` are parsed from a JSON string like the
    base's dict fields (so a command line can pass a dict). ``TrainingArguments.__post_init__`` parses the fields
    listed in its class attribute ``_VALID_DICT_FIELDS``; there is no public way to add one."""

    def decorate(arguments_class: type) -> type:
        arguments_class._VALID_DICT_FIELDS = list(arguments_class._VALID_DICT_FIELDS) + list(fields)
        return arguments_class

    return decorate


class TrainerPrivateHooks:
    """Mixin for ``transformers.Trainer`` subclasses (put it first among the bases): maps Trainer's private
    dataset-column hook onto the public :meth:`signature_columns`.

    ``Trainer._remove_unused_columns`` keeps only the columns named by ``self._signature_columns``, which
    ``_set_signature_columns_if_needed`` fills from the model's ``forward`` arguments; a trainer whose collator needs
    other columns (raw preference rows) says which here."""

    def signature_columns(self) -> list[str] | None:
        """The dataset columns to keep when ``remove_unused_columns=True``; ``None``: the framework's choice."""
        return None

    def _set_signature_columns_if_needed(self):
        columns = self.signature_columns()
        if columns is None:
            return super()._set_signature_columns_if_needed()
        if self._signature_columns is None:
            self._signature_columns = list(columns)


# ================================================================================================================
# accelerate: the process-wide state


def process_state_is_configured() -> bool:
    """Whether accelerate's process state (``PartialState``) was set up in this process. ``PartialState()`` itself
    would set it up; only its shared dict tells (``accelerate.state.is_initialized`` answers for the
    ``AcceleratorState`` instead)."""
    from accelerate import PartialState

    return bool(PartialState._shared_state)


def reset_accelerator_state() -> None:
    """Forget accelerate's ``AcceleratorState`` (its engine plugins) so that the next ``Trainer`` of this process
    sets up its own engine: accelerate refuses a second DeepSpeed plugin otherwise, and would keep the first FSDP
    plugin. The process state and the process group stay up. (accelerate's own tests reset it the same way; there is
    no public call.)"""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def enable_fsdp_on_cpu_processes(state: Any, plugin: Any) -> None:
    """Record FSDP as the engine of CPU processes: accelerate enables FSDP only on accelerators and would run DDP.

    Every later ``AcceleratorState()`` (the optimizer and scheduler wrappers create one) copies the process state's
    fields over its own: FSDP is recorded in both, or accelerate forgets it after ``prepare`` (and then, e.g.,
    ``get_state_dict`` returns the shards instead of full tensors). :func:`disable_fsdp_on_cpu_processes` undoes
    it."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def disable_fsdp_on_cpu_processes() -> None:
    """Undo :func:`enable_fsdp_on_cpu_processes` (nothing else records FSDP on CPU processes: accelerate never does,
    so the process state tells whether it was done)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    process = PartialState()
    if process.distributed_type == DistributedType.FSDP and process.device.type == "cpu":
        process.distributed_type = DistributedType.MULTI_CPU


# ================================================================================================================
# TRL: DPOTrainer


class DPOTrainerPrivateHooks(TrainerPrivateHooks):
    """Mixin for ``trl.DPOTrainer`` subclasses (put it first among the bases): maps DPOTrainer's private extension
    points onto public, named hooks, which the subclass implements.

    ==============================================  ==============================================================
    TRL calls (private)                             the subclass implements
    ==============================================  ==============================================================
    ``_prepare_dataset(dataset, pc, args, name)``   :meth:`prepare_dataset` ``(dataset, name)``
    ``_precompute_ref_logps(dataset, name, bs)``    :meth:`precompute_reference_log_probs` ``(dataset, name, bs)``
    ``_compute_loss(model, inputs, return_outputs)`` :meth:`preference_loss` (the same arguments)
    ``_tag_names`` (model-card and model tags)      :attr:`model_card_tags`
    ==============================================  ==============================================================
    """

    #: Tags TRL adds to the model and its model card.
    model_card_tags: tuple[str, ...] = ("trl", "dpo")

    @property
    def _tag_names(self) -> list[str]:
        return list(self.model_card_tags)

    def prepare_dataset(self, dataset, name: str):
        raise NotImplementedError

    def precompute_reference_log_probs(self, dataset, name: str, batch_size: int):
        raise NotImplementedError

    def preference_loss(self, model, inputs, return_outputs: bool):
        raise NotImplementedError

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepare_dataset(dataset, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.precompute_reference_log_probs(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        return self.preference_loss(model, inputs, return_outputs)


def trl_metric_store(trainer: Any, mode: str) -> MutableMapping[str, list]:
    """``trainer._metrics[mode]``: TRL trainers' per-step metric lists, averaged and emitted by their ``log``; a
    subclass adds its own metrics there so they are logged the same way."""
    return trainer._metrics[mode]


def count_trained_tokens(trainer: Any, num_tokens: int) -> int:
    """Add ``num_tokens`` (summed over processes) to TRL's ``num_tokens`` count, per tensor-parallel group as TRL
    counts, and return the total (``DPOTrainer._total_train_tokens`` / ``_tp_size``)."""
    trainer._total_train_tokens += num_tokens // trainer._tp_size
    return trainer._total_train_tokens


def remove_trl_fused_lm_head_patch(model: Any) -> None:
    """Remove the instance-level ``forward`` that ``trl.DPOTrainer`` installs on the model (its fused LM head), if
    any. It closes over the original bound ``forward``: a deep copy of a patched model would run the original model,
    and every new trainer would wrap the previous patch again."""
    model.__dict__.pop("forward", None)


__all__ = [
    "CACHE_NAME",
    "LEGACY_CACHE_NAME",
    "DPOTrainerPrivateHooks",
    "TrainerPrivateHooks",
    "cache_of",
    "checkpoint_keys_to_ignore",
    "compile_on_every_device",
    "count_trained_tokens",
    "dict_fields_parsed_from_json",
    "disable_fsdp_on_cpu_processes",
    "enable_fsdp_on_cpu_processes",
    "layer_classes_not_to_split",
    "pop_cache_argument",
    "prepare_trainer_inputs",
    "process_state_is_configured",
    "remove_trl_fused_lm_head_patch",
    "reset_accelerator_state",
    "trl_metric_store",
]
