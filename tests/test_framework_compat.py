"""One test per workaround in ``fun_audio_chat.framework_compat``: each fails when a supported release of
transformers, accelerate or TRL moves what the workaround relies on (a renamed private hook, a hook no longer called,
a state field no longer copied), so the module's version table is checked, not just stated."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from fun_audio_chat import framework_compat as compat

# ------------------------------------------------------------------------------------------ transformers: cache name


def test_cache_name_is_the_field_the_installed_model_outputs_declare():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    assert compat.CACHE_NAME in BaseModelOutputWithPast.__dataclass_fields__
    assert {compat.CACHE_NAME, compat.LEGACY_CACHE_NAME} == {"cache", "past_key_values"}
    marker = object()
    assert compat.cache_of({compat.LEGACY_CACHE_NAME: marker}) is marker  # callers may use the other spelling
    assert compat.cache_of(BaseModelOutputWithPast(**{compat.CACHE_NAME: marker})) is marker
    with pytest.raises(ValueError, match="once"):
        compat.pop_cache_argument(object(), {"cache": object()})


# ------------------------------------------------------------------------------------- transformers: model attributes


class _Block(nn.Module):
    pass


def _tiny_pretrained_model():
    from transformers import PretrainedConfig, PreTrainedModel

    class Model(PreTrainedModel):
        config_class = PretrainedConfig
        _no_split_modules = ["_Block"]
        _keys_to_ignore_on_load_unexpected = [r"rotary\.inv_freq"]

        def __init__(self, config):
            super().__init__(config)
            self.block = _Block()

    return Model(PretrainedConfig())


def test_layer_classes_not_to_split_is_what_transformers_reads_for_device_maps():
    from transformers import PreTrainedModel, modeling_utils

    assert "_no_split_modules" in vars(PreTrainedModel)
    assert "_no_split_modules" in inspect.getsource(modeling_utils)  # still read by from_pretrained's device maps
    assert compat.layer_classes_not_to_split(_tiny_pretrained_model()) == ["_Block"]
    assert compat.layer_classes_not_to_split(nn.Linear(1, 1)) == []


def test_checkpoint_keys_to_ignore_is_what_from_pretrained_skips():
    from transformers import PreTrainedModel, modeling_utils

    assert "_keys_to_ignore_on_load_unexpected" in vars(PreTrainedModel)
    assert "_keys_to_ignore_on_load_unexpected" in inspect.getsource(modeling_utils)
    assert compat.checkpoint_keys_to_ignore(_tiny_pretrained_model()) == [r"rotary\.inv_freq"]


def test_compile_on_every_device_sets_the_flag_generate_reads():
    from transformers import CompileConfig
    from transformers.generation import utils

    config = compat.compile_on_every_device(CompileConfig())
    assert config._compile_all_devices is True
    assert "compile_config._compile_all_devices" in inspect.getsource(utils)  # what generate() checks off GPU
    assert "_compile_all_devices" not in config.to_dict()  # not saved with the generation config


def test_keep_extra_generation_fields_keeps_our_fields_through_a_dict_round_trip():
    from transformers import GenerationConfig, PretrainedConfig

    derived = GenerationConfig.from_model_config(PretrainedConfig())
    assert derived._from_model_config is True  # the mark the workaround clears
    # while marked, GenerationConfig drops fields it does not define; cleared, it keeps them
    marked = {**derived.to_dict(), "speech_temperature": 0.8, "_from_model_config": True}
    assert not hasattr(GenerationConfig(**marked), "speech_temperature")
    kept = compat.keep_extra_generation_fields(derived)
    assert kept is derived and derived._from_model_config is False
    assert GenerationConfig(**{**derived.to_dict(), "speech_temperature": 0.8}).speech_temperature == 0.8


def test_generate_preparation_outside_generate_means_what_generate_means():
    """The steps generate() runs before decoding, run for one prompt outside it (continuous batching): the hooks
    exist on GenerationMixin and generate() itself calls each one, and they resolve lengths, processors, stopping
    criteria and EOS ids as generate() does."""
    from transformers import GenerationMixin
    from transformers.generation import (
        LogitsProcessorList,
        MaxLengthCriteria,
        StoppingCriteriaList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        utils,
    )

    from fun_audio_chat.tiny import tiny_model_and_processor

    hooks = ("_prepare_generation_config", "_prepare_special_tokens", "_prepare_generated_length")
    hooks += ("_get_logits_processor", "_get_stopping_criteria")
    generate_source = inspect.getsource(utils.GenerationMixin.generate)
    for hook in hooks:
        assert hasattr(GenerationMixin, hook), hook
        assert f"self.{hook}(" in generate_source, hook
    model, _ = tiny_model_and_processor(seed=0)
    prompt = torch.tensor([[11, 12, 13, 14]])
    prepared = compat.prepare_generation_outside_generate(
        model,
        prompt,
        {},
        settings={"max_new_tokens": 7, "do_sample": True, "temperature": 0.7, "top_k": 5, "eos_token_id": [3, 9]},
        logits_processor=LogitsProcessorList(),
        stopping_criteria=StoppingCriteriaList(),
    )
    assert prepared.config.max_length == 4 + 7 and prepared.config.temperature == 0.7
    kinds = [type(processor) for processor in prepared.logits_processor]
    assert TemperatureLogitsWarper in kinds and TopKLogitsWarper in kinds
    assert any(isinstance(criterion, MaxLengthCriteria) for criterion in prepared.stopping_criteria)
    assert prepared.eos_token_ids == {3, 9}
    with pytest.raises(ValueError, match="not generation settings"):
        compat.prepare_generation_outside_generate(model, prompt, {}, settings={"max_new_tokens": 2, "bogus": 1})


# --------------------------------------------------------------------------------- transformers: Trainer internals


def _trainer(tmp_path, trainer_class=None, **arguments):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=2,
        **arguments,
    )
    return (trainer_class or Trainer)(model=nn.Linear(2, 2), args=args, data_collator=lambda rows: rows)


def test_prepare_trainer_inputs_moves_a_batch_as_training_step_does(tmp_path):
    trainer = _trainer(tmp_path)
    batch = compat.prepare_trainer_inputs(trainer, {"x": torch.ones(2, dtype=torch.float64), "note": "kept"})
    assert batch["x"].device == trainer.args.device and batch["note"] == "kept"


def test_signature_columns_hook_chooses_the_columns_trainer_keeps(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    class KeepsA(compat.TrainerPrivateHooks, Trainer):
        def signature_columns(self):
            return ["a"]

    data = Dataset.from_dict({"a": [1, 2], "b": [3, 4]})
    kept = KeepsA(
        model=nn.Linear(2, 2),
        args=_trainer(tmp_path, remove_unused_columns=True).args,
        train_dataset=data,
        data_collator=lambda rows: rows,
    )
    (first_batch,) = list(kept.get_train_dataloader())[:1]
    assert [sorted(row) for row in first_batch] == [["a"], ["a"]]
    plain = Trainer(model=nn.Linear(2, 2), args=kept.args, train_dataset=data, data_collator=lambda rows: rows)
    with pytest.raises(ValueError, match="No columns"):  # the model's forward names neither column
        list(plain.get_train_dataloader())


def test_dict_fields_parsed_from_json_adds_to_the_base_fields(tmp_path):
    from fun_audio_chat.trainers.dpo import FunAudioChatDPOConfig

    config = FunAudioChatDPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        task_weights='{"asr": 2.0}',
        lr_scheduler_kwargs='{"min_lr_rate": 0.1}',
    )
    assert config.task_weights == {"asr": 2.0}
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}  # the base's own dict fields still parse


# ---------------------------------------------------------------------------------------------------- accelerate


def test_process_state_is_configured_and_reset_accelerator_state():
    from accelerate import Accelerator, PartialState
    from accelerate.state import is_initialized

    PartialState()
    assert compat.process_state_is_configured()
    Accelerator(cpu=True)
    assert is_initialized()
    compat.reset_accelerator_state()
    assert not is_initialized()  # the next Trainer sets up its own engine
    assert compat.process_state_is_configured()  # the process state (and process group) stays


def test_fsdp_on_cpu_processes_is_recorded_in_the_process_state_and_undone():
    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    process = PartialState()
    before = process.distributed_type
    state = SimpleNamespace(distributed_type=before, fsdp_plugin=None)
    try:
        compat.enable_fsdp_on_cpu_processes(state, plugin="plugin")
        assert PartialState().distributed_type == DistributedType.FSDP
        assert (state.distributed_type, state.fsdp_plugin) == (DistributedType.FSDP, "plugin")
        # what makes recording it in the process state necessary: a later AcceleratorState shares its fields
        assert AcceleratorState._shared_state is not PartialState._shared_state
        assert "PartialState" in inspect.getsource(AcceleratorState.__init__)
        compat.disable_fsdp_on_cpu_processes()
        assert PartialState().distributed_type == DistributedType.MULTI_CPU
    finally:
        PartialState().distributed_type = before


# ------------------------------------------------------------------------------------------------------------ TRL


@pytest.mark.parametrize(
    ("private", "public", "arguments"),
    [
        ("_prepare_dataset", "prepare_dataset", ["dataset", "processing_class", "args", "dataset_name"]),
        ("_precompute_ref_logps", "precompute_reference_log_probs", ["dataset", "name", "batch_size"]),
        ("_compute_loss", "preference_loss", ["model", "inputs", "return_outputs"]),
    ],
)
def test_dpo_trainer_still_calls_the_private_hooks_the_mixin_maps(private, public, arguments):
    from trl import DPOTrainer

    assert list(inspect.signature(getattr(DPOTrainer, private)).parameters)[1:] == arguments
    assert f"self.{private}(" in inspect.getsource(DPOTrainer)
    assert getattr(compat.DPOTrainerPrivateHooks, private) is not getattr(DPOTrainer, private)
    assert callable(getattr(compat.DPOTrainerPrivateHooks, public))


def test_dpo_trainer_tags_metrics_token_count_and_fused_head_patch(tmp_path):
    """Through a real FunAudioChatDPOTrainer: the model-card tags reach the model, the metric store and token count
    are TRL's (logged as ``num_tokens`` and ``rewards/*``), the fused-head patch is removed, and
    ``remove_unused_columns=True`` keeps the preference columns (the signature hook)."""
    from fun_audio_chat.tiny import tiny_processor
    from tests.trainers.dpo_helpers import make_trainer, synthetic_rows, tiny_model

    model = tiny_model()
    trainer = make_trainer(
        model, synthetic_rows(1, seed=0), tiny_processor(), tmp_path, max_steps=1, remove_unused_columns=True
    )
    assert "fun-audio-chat" in model.model_tags and "dpo" in model.model_tags
    assert "forward" not in vars(model)
    trainer.train()
    logged = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    assert logged["num_tokens"] > 0 and "rewards/chosen" in logged and "logps/chosen_text" in logged
    trl_patched = nn.Linear(1, 1)
    trl_patched.forward = lambda *a: None
    compat.remove_trl_fused_lm_head_patch(trl_patched)
    assert "forward" not in vars(trl_patched)
