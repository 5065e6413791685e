"""Hub round trips through a real HTTP server (``tests/hub_server.py`` on 127.0.0.1), not mocks.

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, and the test session runs with
``HF_HUB_OFFLINE=1``, so the pushing and pulling happen in one worker subprocess (this file run as a script with
``--worker``) whose environment points at the server, with a dummy token and a fresh ``HF_HOME``. The worker
writes a JSON report; the tests below check it, one aspect each:

* model: ``model.push_to_hub`` → ``from_pretrained(repo_id)`` gives the same weights and the same ``generate``
  outputs (text and speech, same seed);
* processor: ``processor.push_to_hub`` → ``AutoProcessor.from_pretrained(repo_id)`` gives the same inputs;
* generation config: non-default speech sampling fields survive the trip;
* merged Core-Cocktail checkpoint: ``merge_weights`` on disk → ``upload_folder`` (and
  ``push_folder_to_hub``) → ``from_pretrained`` equals the local merged checkpoint;
* the official file layout and the model card (how to load it with this library);
* a missing repository gives a clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hub_server import LocalHubServer  # noqa: E402

REPO = "fac-tiny"
OFFICIAL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "speech_tokenizer/tokenizer.json",
    "speech_tokenizer/tokenizer_config.json",
    "speech_tokenizer/special_tokens_map.json",
    "README.md",
}


# ------------------------------------------------------------------------------------------------ worker
def _worker(workdir: Path) -> dict:
    """Runs in the subprocess (HF_ENDPOINT points at the local server)."""
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoProcessor, GenerationConfig, Qwen3ForCausalLM

    import fun_audio_chat
    from fun_audio_chat import FunAudioChatForConditionalGeneration, FunAudioChatProcessor, tiny_processor
    from fun_audio_chat.hub import MODEL_CARD_MARKER, FunAudioChatHubMixin, push_folder_to_hub, write_model_card
    from fun_audio_chat.processing import example_audio_path
    from fun_audio_chat.tiny import tiny_config
    from fun_audio_chat.trainers import merge_weights

    torch.set_num_threads(1)
    report: dict = {"integrated": {
        "model": issubclass(FunAudioChatForConditionalGeneration, FunAudioChatHubMixin),
        "processor": issubclass(FunAudioChatProcessor, FunAudioChatHubMixin),
    }}
    # Until the classes inherit the mixin, exercise it through same-named subclasses (the saved files name the
    # class, so they must keep the public names).
    model_cls = FunAudioChatForConditionalGeneration
    if not report["integrated"]["model"]:
        model_cls = type("FunAudioChatForConditionalGeneration", (FunAudioChatHubMixin, model_cls), {})
    processor = tiny_processor()
    if not report["integrated"]["processor"]:
        processor.__class__ = type("FunAudioChatProcessor", (FunAudioChatHubMixin, FunAudioChatProcessor), {})

    api = HfApi()
    user = api.whoami()["name"]
    repo_id = f"{user}/{REPO}"

    torch.manual_seed(0)
    model = model_cls(tiny_config()).eval()
    model.generation_config.speech_temperature = 0.7
    model.generation_config.speech_top_k = 25
    model.generation_config.max_new_tokens = 12
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)

    report["files"] = sorted(api.list_repo_files(repo_id))
    card = Path(api.hf_hub_download(repo_id, "README.md")).read_text()
    report["card"] = {
        "ours": MODEL_CARD_MARKER in card,
        "load_model": f'FunAudioChatForConditionalGeneration.from_pretrained("{repo_id}"' in card,
        "load_processor": f'FunAudioChatProcessor.from_pretrained("{repo_id}")' in card,
        "library_name": "library_name: transformers" in card,
        "describes_config": "Speech Refined Head" in card,
    }

    # ---- the card's own usage example runs against the pushed repo (with a short reply)
    import re
    import shutil

    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    shutil.copy(example_audio_path(), workdir / "question.wav")
    snippet = snippet.replace('"question.wav"', repr(str(workdir / "question.wav")))
    snippet = snippet.replace("max_new_tokens=512", "max_new_tokens=6")
    card_namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), card_namespace)
    report["card"]["example_runs"] = isinstance(card_namespace.get("codes"), list)

    # ---- pull everything back by repo id
    loaded = FunAudioChatForConditionalGeneration.from_pretrained(repo_id).eval()
    loaded_processor = AutoProcessor.from_pretrained(repo_id)
    loaded_generation = GenerationConfig.from_pretrained(repo_id)
    report["loaded_classes"] = [type(loaded).__name__, type(loaded_processor).__name__]

    original_sd, loaded_sd = model.state_dict(), loaded.state_dict()
    report["model_state_equal"] = sorted(original_sd) == sorted(loaded_sd) and all(
        torch.equal(original_sd[k], loaded_sd[k]) for k in original_sd
    )

    messages = [{"role": "user", "content": [{"type": "audio", "path": example_audio_path()}]}]

    def inputs_of(proc):
        return proc.apply_chat_template(messages, add_generation_prompt=True, speech_output=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")

    inputs, loaded_inputs = inputs_of(processor), inputs_of(loaded_processor)
    report["processor_inputs_equal"] = sorted(inputs) == sorted(loaded_inputs) and all(
        torch.equal(inputs[k], loaded_inputs[k]) for k in inputs
    )
    text = "hello, what is the weather today?"
    report["tokenizer_equal"] = (
        processor.tokenizer(text)["input_ids"] == loaded_processor.tokenizer(text)["input_ids"]
        and processor.speech_tokenizer.get_vocab() == loaded_processor.speech_tokenizer.get_vocab()
        and processor.chat_template == loaded_processor.chat_template
        and processor.to_dict() == loaded_processor.to_dict()
    )

    def run(m, batch):
        torch.manual_seed(123)
        out = m.generate(**batch, force_audio_bos=True, return_dict_in_generate=True)
        return out.sequences, out.speech_ids

    (seq_a, sp_a), (seq_b, sp_b) = run(model, inputs), run(loaded, loaded_inputs)
    report["generate_equal"] = torch.equal(seq_a, seq_b) and torch.equal(sp_a, sp_b)
    report["generated_shapes"] = [list(seq_a.shape), list(sp_a.shape)]

    fields = ("speech_temperature", "speech_top_k", "speech_top_p", "speech_do_sample", "max_new_tokens",
              "return_speech", "eos_token_id", "pad_token_id")
    report["generation_config"] = {
        name: [getattr(model.generation_config, name, None), getattr(loaded_generation, name, None),
               getattr(loaded.generation_config, name, None)]
        for name in fields
    }

    # ---- Core-Cocktail: merge on disk, upload the merged folder, load it back
    tuned_dir, base_dir, merged_dir = workdir / "tuned", workdir / "base", workdir / "merged"
    model.save_pretrained(tuned_dir)
    processor.save_pretrained(tuned_dir)
    torch.manual_seed(1)
    Qwen3ForCausalLM(model.config.text_config).save_pretrained(base_dir)
    merge_weights(str(tuned_dir), str(base_dir), 0.5, output_dir=str(merged_dir), show_progress=False)
    write_model_card(merged_dir, f"{user}/fac-tiny-merged")
    api.create_repo("fac-tiny-merged", exist_ok=True)
    api.upload_folder(repo_id=f"{user}/fac-tiny-merged", folder_path=str(merged_dir),
                      commit_message="Upload Core-Cocktail merge")
    push_folder_to_hub(tuned_dir, "fac-tiny-tuned")  # a folder without a card gets one; the folder is untouched
    report["tuned_dir_untouched"] = not (tuned_dir / "README.md").exists()
    (tuned_dir / "README.md").write_text("# My own card\n")  # a card written by the user is uploaded as it is
    push_folder_to_hub(tuned_dir, "fac-tiny-own-card")
    report["own_card_kept"] = Path(api.hf_hub_download(f"{user}/fac-tiny-own-card", "README.md")).read_text() == (
        "# My own card\n"
    )

    local_merged = FunAudioChatForConditionalGeneration.from_pretrained(merged_dir).eval()
    hub_merged = FunAudioChatForConditionalGeneration.from_pretrained(f"{user}/fac-tiny-merged").eval()
    merged_processor = AutoProcessor.from_pretrained(f"{user}/fac-tiny-merged")
    a, b = local_merged.state_dict(), hub_merged.state_dict()
    report["merged_state_equal"] = all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    report["merged_differs_from_tuned"] = not torch.equal(
        a["language_model.model.layers.0.self_attn.q_proj.weight"],
        original_sd["language_model.model.layers.0.self_attn.q_proj.weight"],
    )
    merged_inputs = inputs_of(merged_processor)
    (seq_c, sp_c), (seq_d, sp_d) = run(local_merged, inputs), run(hub_merged, merged_inputs)
    report["merged_generate_equal"] = torch.equal(seq_c, seq_d) and torch.equal(sp_c, sp_d)
    merged_files = set(api.list_repo_files(f"{user}/fac-tiny-merged"))
    merged_card = Path(api.hf_hub_download(f"{user}/fac-tiny-merged", "README.md")).read_text()
    tuned_card = Path(api.hf_hub_download(f"{user}/fac-tiny-tuned", "README.md")).read_text()
    report["merged"] = {
        "manifest_uploaded": "merge_manifest.json" in merged_files,
        "card_mentions_merge": "Core-Cocktail merge" in merged_card and "0.5 * M1 + 0.5 * M0" in merged_card,
        "card_is_ours": MODEL_CARD_MARKER in merged_card,
        "tuned_card_is_ours": MODEL_CARD_MARKER in tuned_card,
    }

    # ---- a missing repository: a clear OSError from transformers
    try:
        FunAudioChatForConditionalGeneration.from_pretrained(f"{user}/does-not-exist")
        report["missing_repo_error"] = None
    except OSError as err:
        report["missing_repo_error"] = str(err)
    report["version"] = fun_audio_chat.__version__
    return report


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hub")
    with LocalHubServer(lifetime=240) as server:
        env = {**os.environ, **server.client_env(workdir / "hf_home")}
        env.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
        out = workdir / "report.json"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir), str(out)],
            env=env, capture_output=True, text=True, timeout=220,
        )
    assert proc.returncode == 0, f"hub worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ tests
def test_model_round_trip_gives_identical_weights_and_outputs(report):
    assert report["loaded_classes"] == ["FunAudioChatForConditionalGeneration", "FunAudioChatProcessor"]
    assert report["model_state_equal"]
    assert report["generate_equal"], report["generated_shapes"]
    assert report["generated_shapes"][1][1] > 0  # speech codes were produced (and compared)


def test_processor_round_trip_gives_identical_inputs(report):
    assert report["processor_inputs_equal"]
    assert report["tokenizer_equal"]


def test_generation_config_round_trip(report):
    for name, (original, from_file, on_model) in report["generation_config"].items():
        assert original == from_file == on_model, name
    assert report["generation_config"]["speech_temperature"][0] == 0.7
    assert report["generation_config"]["speech_top_k"][0] == 25


def test_merged_core_cocktail_checkpoint_round_trip(report):
    assert report["merged_state_equal"]
    assert report["merged_differs_from_tuned"]
    assert report["merged_generate_equal"]
    assert report["merged"]["manifest_uploaded"]
    assert report["merged"]["card_mentions_merge"] and report["merged"]["card_is_ours"]
    assert report["merged"]["tuned_card_is_ours"] and report["tuned_dir_untouched"]
    assert report["own_card_kept"]


def test_pushed_repo_has_official_layout_and_model_card(report):
    missing = OFFICIAL_FILES - set(report["files"])
    assert not missing, f"missing from the pushed repo: {sorted(missing)}"
    assert all(report["card"].values()), report["card"]


def test_model_and_processor_classes_push_model_cards(report):
    """``model.push_to_hub`` / ``processor.push_to_hub`` write the Fun-Audio-Chat card, not transformers' placeholder."""
    assert all(report["integrated"].values()), report["integrated"]


def test_missing_repo_error_is_clear(report):
    assert report["missing_repo_error"] and "does-not-exist" in report["missing_repo_error"]


def test_hub_server_errors_and_lifetime():
    """Unknown repos answer 404 with the Hub's error code; the server stops itself after its lifetime."""
    import time
    import urllib.error
    import urllib.request

    server = LocalHubServer(lifetime=1.0).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/api/models/nobody/nothing", timeout=5)  # noqa: S310
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "RepoNotFound"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not server._stopped.is_set():
            time.sleep(0.1)
        assert server._stopped.is_set()
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url + "/api/models/nobody/nothing", timeout=2)  # noqa: S310
    finally:
        server.stop()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    result = _worker(Path(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result, indent=2))
