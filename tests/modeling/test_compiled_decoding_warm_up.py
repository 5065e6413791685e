"""Warming compiled decoding up at start-up, and torch's compile caches saved for the next process."""

import pytest
import torch

from fun_audio_chat.modeling.compiled_decoding import compiled_decoding_settings, load_compile_cache

from .model_tester import FunAudioChatModelTester


@pytest.mark.slow
def test_after_the_warm_up_generate_reuses_the_compiled_graphs(tmp_path):
    """The warm-up (a longer prompt and reply, no padding) compiles the graphs a padded batch with a shorter prompt
    and reply then uses without recompiling; it gives the uncompiled path's greedy tokens and codes, and the compile
    caches are saved to the file a next process loads (benchmarks/bench_generate.py times that second start)."""
    tester = FunAudioChatModelTester()
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.create_model(config)
    controls = {"do_sample": False, "speech_do_sample": False, "pad_token_id": 500, "force_audio_bos": True}
    with torch.no_grad():
        expected = model.generate(**inputs, **controls, max_new_tokens=4, return_dict_in_generate=True)
    artifacts = tmp_path / "compile-cache.bin"
    timings = model.warm_up_compiled_decoding(
        batch_sizes=(2,), prompt_length=inputs["input_ids"].shape[1] + 2, max_new_tokens=8, cache_path=artifacts
    )
    assert set(timings) == {2}
    assert artifacts.is_file() and artifacts.stat().st_size > 0
    assert load_compile_cache(artifacts) and not load_compile_cache(tmp_path / "missing.bin")
    unreadable = tmp_path / "unreadable.bin"
    unreadable.write_bytes(b"not a torch compile cache")
    assert not load_compile_cache(unreadable)  # torch only warns: the caller must not report it as loaded
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        found = model.generate(
            **inputs, **controls, max_new_tokens=4, return_dict_in_generate=True, **compiled_decoding_settings()
        )
    assert torch.equal(found.sequences, expected.sequences)
    assert torch.equal(found.speech_ids, expected.speech_ids)


def test_warm_up_refuses_unusable_shapes():
    model = FunAudioChatModelTester().create_model()
    with pytest.raises(ValueError, match="max_new_tokens >= 3"):
        model.warm_up_compiled_decoding(max_new_tokens=1)
    with pytest.raises(ValueError, match="positive batch sizes"):
        model.warm_up_compiled_decoding(batch_sizes=(0,))
