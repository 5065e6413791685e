"""Hub round trips through a real HTTP server (``tests/hub_server.py`` on 127.0.0.1), not mocks.

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, and the test session runs with
``HF_HUB_OFFLINE=1``, so the pushing and pulling happen in one worker subprocess (this file run as a script with
``--worker``) whose environment points at the server, with a dummy token and a fresh ``HF_HOME``. The worker only
records what it finds on the Hub — file lists, the cards' text, both sides of every comparison (tensors in
``tensors.safetensors``), never a verdict — and the tests below compare, one aspect each. Each scenario of the worker
runs even when another raised, and a test fails with the traceback of its own scenario:

* ``push_with_model_card(model, processor, repo)``: the official layout and the Fun-Audio-Chat card in one repo;
  ``from_pretrained(repo_id)`` gives the same weights, inputs and ``generate`` outputs; the card's own example runs;
* transformers' own ``model.push_to_hub(..., tags=)`` / ``processor.push_to_hub``: same layout, transformers' card
  with the tags; pushing again to a repo with our card keeps it and adds the tags;
* ``processor.save_pretrained(dir, push_to_hub=True)`` uploads exactly the files it saved;
* generation config: non-default speech sampling fields survive the trip;
* merged Core-Cocktail checkpoint: ``merge_weights`` on disk → ``upload_folder`` / ``push_folder_to_hub`` →
  ``from_pretrained`` equals the local merged checkpoint, with a card describing the merge;
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

pytestmark = pytest.mark.slow

REPO = "fac-tiny"
PLAIN_REPO = "fac-tiny-plain"
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
    """Runs in the subprocess (HF_ENDPOINT points at the local server).

    Each scenario records raw data (file lists, card text, the values on both sides of a comparison), never a
    verdict; the tests compare. A scenario that raises records its traceback under ``report["errors"]`` and the
    others still run, so each test fails for its own scenario only, showing why (:func:`ran`)."""
    import re
    import shutil
    import traceback

    import torch
    from huggingface_hub import HfApi
    from safetensors.torch import save_file
    from transformers import AutoProcessor, GenerationConfig, Qwen3ForCausalLM

    import fun_audio_chat
    from fun_audio_chat import FunAudioChatForConditionalGeneration, tiny_processor
    from fun_audio_chat.hub import push_folder_to_hub, push_with_model_card, write_model_card
    from fun_audio_chat.processing import example_audio_path
    from fun_audio_chat.tiny import tiny_config
    from fun_audio_chat.trainers import merge_weights

    torch.set_num_threads(1)
    api = HfApi()
    user = api.whoami()["name"]
    report: dict = {"user": user, "files": {}, "cards": {}, "errors": {}}
    tensors: dict[str, torch.Tensor] = {}  # "<comparison>/<a|b>/<key>" -> tensor, compared by the tests
    repo_id = f"{user}/{REPO}"

    def record_repo(name: str) -> None:
        repo = f"{user}/{name}"
        report["files"][name] = sorted(api.list_repo_files(repo))
        report["cards"][name] = Path(api.hf_hub_download(repo, "README.md")).read_text()

    def record_pair(comparison: str, a: dict, b: dict) -> None:
        for side, values in (("a", a), ("b", b)):
            for key, value in values.items():
                tensors[f"{comparison}/{side}/{key}"] = value.detach().contiguous().clone()

    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(tiny_config()).eval()
    model.generation_config.speech_temperature = 0.7
    model.generation_config.speech_top_k = 25
    model.generation_config.max_new_tokens = 12
    processor = tiny_processor()
    messages = [{"role": "user", "content": [{"type": "audio", "path": example_audio_path()}]}]

    def inputs_of(proc):
        return proc.apply_chat_template(
            messages,
            add_generation_prompt=True,
            speech_output=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )

    def run(m, batch):
        torch.manual_seed(123)
        out = m.generate(**batch, force_audio_bos=True, return_dict_in_generate=True)
        return {"sequences": out.sequences, "speech_ids": out.speech_ids}

    inputs = inputs_of(processor)

    def card_push():
        """One call: weights, processor files and the Fun-Audio-Chat card; the card's own example runs against the
        pushed repo and gives what it gives against the same model saved locally."""
        commit = push_with_model_card(model, processor, REPO, tags=["my-experiment"])
        report["commit_repo_id"] = commit.repo_url.repo_id
        record_repo(REPO)
        local_dir = workdir / "card-model-local"
        model.save_pretrained(local_dir)
        processor.save_pretrained(local_dir)
        snippet = re.search(r"```python\n(.*?)```", report["cards"][REPO], re.DOTALL).group(1)
        shutil.copy(example_audio_path(), workdir / "question.wav")
        snippet = snippet.replace('"question.wav"', repr(str(workdir / "question.wav")))
        snippet = snippet.replace("max_new_tokens=512", "max_new_tokens=6")
        report["card_example"] = {}
        for source, code in (("hub", snippet), ("local", snippet.replace(f'"{repo_id}"', repr(str(local_dir))))):
            assert source == "hub" or code != snippet, "the card's example does not load the pushed repo by id"
            namespace: dict = {}
            torch.manual_seed(7)
            exec(compile(code, "README.md", "exec"), namespace)
            report["card_example"][source] = {
                "codes": namespace["codes"],
                "reply": namespace["processor"].decode_text(
                    namespace["out"].sequences[0, namespace["inputs"]["input_ids"].shape[1] :]
                ),
            }

    def round_trip():
        """Pull everything back by repo id: weights, processor, generation config, and what they compute."""
        loaded = FunAudioChatForConditionalGeneration.from_pretrained(repo_id).eval()
        loaded_processor = AutoProcessor.from_pretrained(repo_id)
        loaded_generation = GenerationConfig.from_pretrained(repo_id)
        report["loaded_classes"] = [type(loaded).__name__, type(loaded_processor).__name__]
        record_pair("model_state", model.state_dict(), loaded.state_dict())
        loaded_inputs = inputs_of(loaded_processor)
        record_pair("processor_inputs", dict(inputs), dict(loaded_inputs))
        text = "hello, what is the weather today?"
        report["tokenized"] = [processor.tokenizer(text)["input_ids"], loaded_processor.tokenizer(text)["input_ids"]]
        report["speech_vocabs"] = [
            processor.speech_tokenizer.get_vocab(),
            loaded_processor.speech_tokenizer.get_vocab(),
        ]
        report["chat_templates"] = [processor.chat_template, loaded_processor.chat_template]
        report["processor_configs"] = [processor.to_dict(), loaded_processor.to_dict()]
        record_pair("generate", run(model, inputs), run(loaded, loaded_inputs))
        fields = (
            "speech_temperature",
            "speech_top_k",
            "speech_top_p",
            "speech_do_sample",
            "max_new_tokens",
            "return_speech",
            "eos_token_id",
            "pad_token_id",
        )
        report["generation_config"] = {
            name: [
                getattr(model.generation_config, name, None),
                getattr(loaded_generation, name, None),
                getattr(loaded.generation_config, name, None),
            ]
            for name in fields
        }

    def transformers_push():
        """transformers' own push_to_hub (tags=): the official layout with transformers' card; pushing again to the
        repo that has our card keeps the card and adds the tags."""
        model.push_to_hub(PLAIN_REPO, tags=["plain-tag"])
        processor.push_to_hub(PLAIN_REPO)
        record_repo(PLAIN_REPO)
        plain = FunAudioChatForConditionalGeneration.from_pretrained(f"{user}/{PLAIN_REPO}").eval()
        record_pair("plain_state", model.state_dict(), plain.state_dict())
        plain_processor = AutoProcessor.from_pretrained(f"{user}/{PLAIN_REPO}")
        record_pair("plain_inputs", dict(inputs), dict(inputs_of(plain_processor)))
        processor.push_to_hub(REPO, tags=["later-tag"])
        report["card_after_transformers_push"] = Path(api.hf_hub_download(repo_id, "README.md")).read_text()

    def processor_push():
        """processor.save_pretrained(..., push_to_hub=True): the files it saves are the files it uploads."""
        saved_dir = workdir / "fac-tiny-processor"
        processor.save_pretrained(saved_dir, push_to_hub=True)
        saved = sorted(str(f.relative_to(saved_dir)) for f in saved_dir.rglob("*") if f.is_file())
        report["processor_push"] = {
            "saved": saved,
            "hub": sorted(api.list_repo_files(f"{user}/fac-tiny-processor")),
            "differing": [
                name
                for name in saved
                if Path(api.hf_hub_download(f"{user}/fac-tiny-processor", name)).read_bytes()
                != (saved_dir / name).read_bytes()
            ],
        }

    def merged():
        """Core-Cocktail: merge on disk, upload the merged folder, load it back."""
        tuned_dir, base_dir, merged_dir = workdir / "tuned", workdir / "base", workdir / "merged"
        model.save_pretrained(tuned_dir)
        processor.save_pretrained(tuned_dir)
        torch.manual_seed(1)
        Qwen3ForCausalLM(model.config.text_config).save_pretrained(base_dir)
        merge_weights(str(tuned_dir), str(base_dir), 0.5, output_dir=str(merged_dir), show_progress=False)
        write_model_card(merged_dir, f"{user}/fac-tiny-merged")
        api.create_repo("fac-tiny-merged", exist_ok=True)
        api.upload_folder(
            repo_id=f"{user}/fac-tiny-merged", folder_path=str(merged_dir), commit_message="Upload Core-Cocktail merge"
        )
        push_folder_to_hub(tuned_dir, "fac-tiny-tuned")  # a folder without a card gets one; the folder is untouched
        report["tuned_dir_files_after_push"] = sorted(f.name for f in tuned_dir.iterdir())
        (tuned_dir / "README.md").write_text("# My own card\n")  # a card written by the user is uploaded as it is
        push_folder_to_hub(tuned_dir, "fac-tiny-own-card")
        for name in ("fac-tiny-merged", "fac-tiny-tuned", "fac-tiny-own-card"):
            record_repo(name)
        local_merged = FunAudioChatForConditionalGeneration.from_pretrained(merged_dir).eval()
        hub_merged = FunAudioChatForConditionalGeneration.from_pretrained(f"{user}/fac-tiny-merged").eval()
        merged_processor = AutoProcessor.from_pretrained(f"{user}/fac-tiny-merged")
        record_pair("merged_state", local_merged.state_dict(), hub_merged.state_dict())
        record_pair(
            "merged_vs_tuned",
            {"q": local_merged.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"]},
            {"q": model.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"]},
        )
        record_pair("merged_generate", run(local_merged, inputs), run(hub_merged, inputs_of(merged_processor)))

    def detokenizer():
        """The detokenizer is a transformers model: push_to_hub, then AutoModel.from_pretrained by repo id."""
        from transformers import AutoModel

        from fun_audio_chat.tiny import tiny_detokenizer

        detokenizer = tiny_detokenizer()
        detokenizer.push_to_hub("fac-tiny-detokenizer")
        report["detokenizer_files"] = sorted(api.list_repo_files(f"{user}/fac-tiny-detokenizer"))
        pulled = AutoModel.from_pretrained(f"{user}/fac-tiny-detokenizer")
        report["detokenizer_class"] = type(pulled).__name__
        record_pair("detokenizer_state", detokenizer.state_dict(), pulled.state_dict())

    def missing_repo():
        """A missing repository: transformers' OSError, recorded with its type."""
        try:
            FunAudioChatForConditionalGeneration.from_pretrained(f"{user}/does-not-exist")
            report["missing_repo_error"] = None
        except OSError as err:
            report["missing_repo_error"] = {"type": type(err).__name__, "message": str(err)}

    for scenario in (card_push, round_trip, transformers_push, processor_push, merged, detokenizer, missing_repo):
        try:
            scenario()
        except Exception:
            report["errors"][scenario.__name__] = traceback.format_exc()
    report["version"] = fun_audio_chat.__version__
    save_file(tensors, str(workdir / "tensors.safetensors"))
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
            env=env,
            capture_output=True,
            text=True,
            timeout=220,
        )
    assert proc.returncode == 0, f"hub worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {**json.loads(out.read_text()), "tensors_path": str(workdir / "tensors.safetensors")}


# ------------------------------------------------------------------------------------------------ tests
def ran(report, *scenarios: str) -> None:
    """Fail with the worker's traceback if one of ``scenarios`` raised (the others' tests still run)."""
    failed = {name: report["errors"][name] for name in scenarios if name in report["errors"]}
    assert not failed, "\n".join(f"worker scenario {name} raised:\n{trace}" for name, trace in failed.items())


@pytest.fixture(scope="module")
def tensors(report):
    from safetensors.torch import load_file

    return load_file(report["tensors_path"])


def assert_pair_equal(tensors, comparison: str) -> None:
    import torch

    a = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{comparison}/a/")}
    b = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{comparison}/b/")}
    assert a and sorted(a) == sorted(b), comparison
    different = [key for key in a if a[key].shape != b[key].shape or not torch.equal(a[key], b[key])]
    assert not different, f"{comparison}: {different}"


def test_model_round_trip_gives_identical_weights_and_outputs(report, tensors):
    ran(report, "card_push", "round_trip")
    assert report["loaded_classes"] == ["FunAudioChatForConditionalGeneration", "FunAudioChatProcessor"]
    assert report["commit_repo_id"] == f"{report['user']}/{REPO}"
    assert_pair_equal(tensors, "model_state")
    assert_pair_equal(tensors, "generate")
    assert tensors["generate/a/speech_ids"].shape[1] > 0  # speech codes were produced (and compared)


def test_processor_round_trip_gives_identical_inputs(report, tensors):
    ran(report, "card_push", "round_trip")
    assert_pair_equal(tensors, "processor_inputs")
    assert report["tokenized"][0] == report["tokenized"][1] and report["tokenized"][0]
    assert report["speech_vocabs"][0] == report["speech_vocabs"][1] and len(report["speech_vocabs"][0]) > 296
    assert report["chat_templates"][0] == report["chat_templates"][1]
    assert report["processor_configs"][0] == report["processor_configs"][1]


def test_generation_config_round_trip(report):
    ran(report, "card_push", "round_trip")
    for name, (original, from_file, on_model) in report["generation_config"].items():
        assert original == from_file == on_model, name
    assert report["generation_config"]["speech_temperature"][0] == 0.7
    assert report["generation_config"]["speech_top_k"][0] == 25


def test_push_with_model_card_uploads_official_layout_and_our_card(report):
    ran(report, "card_push")
    missing = OFFICIAL_FILES - set(report["files"][REPO])
    assert not missing, f"missing from the pushed repo: {sorted(missing)}"
    card, repo_id = report["cards"][REPO], f"{report['user']}/{REPO}"
    assert card.startswith("---\nlibrary_name: transformers\n")
    metadata = card.split("---")[1]
    assert "- my-experiment" in metadata and "- fun-audio-chat" in metadata
    assert f'FunAudioChatForConditionalGeneration.from_pretrained("{repo_id}"' in card
    assert f'FunAudioChatProcessor.from_pretrained("{repo_id}")' in card
    assert "Speech Refined Head: 2 layers, hidden size 32" in card  # read from the pushed config.json
    assert "vocabulary 512" in card


def test_card_example_runs_against_the_pushed_repo(report):
    ran(report, "card_push")
    hub, local = report["card_example"]["hub"], report["card_example"]["local"]
    # the example loads the pushed repo by id and computes what the same model saved locally computes
    assert hub == local
    assert hub["reply"]  # six steps of a random tiny model: a text reply (it may not start speaking that soon)
    assert all(isinstance(code, int) and 0 <= code < 296 for code in hub["codes"])


def test_transformers_push_to_hub_uploads_official_layout_with_tags(report, tensors):
    ran(report, "transformers_push")
    assert OFFICIAL_FILES <= set(report["files"][PLAIN_REPO])
    plain_card = report["cards"][PLAIN_REPO]
    assert "- plain-tag" in plain_card.split("---")[1]
    assert "fun_audio_chat" not in plain_card  # transformers' own card: the library adds nothing behind its back
    assert_pair_equal(tensors, "plain_state")
    assert_pair_equal(tensors, "plain_inputs")
    # a later transformers push keeps the Fun-Audio-Chat card and adds its tags
    after = report["card_after_transformers_push"]
    assert "generated by fun_audio_chat" in after and "later-tag" in after and "my-experiment" in after


def test_detokenizer_push_to_hub_and_auto_model_round_trip(report, tensors):
    ran(report, "detokenizer")
    assert {"config.json", "model.safetensors"} <= set(report["detokenizer_files"])
    assert report["detokenizer_class"] == "CosyVoice3Detokenizer"
    assert_pair_equal(tensors, "detokenizer_state")


def test_processor_save_pretrained_push_uploads_what_it_saved(report):
    ran(report, "processor_push")
    pushed = report["processor_push"]
    assert "speech_tokenizer/tokenizer.json" in pushed["saved"] and "preprocessor_config.json" in pushed["saved"]
    assert set(pushed["saved"]) <= set(pushed["hub"])
    assert set(pushed["hub"]) - set(pushed["saved"]) <= {"README.md", ".gitattributes"}
    assert pushed["differing"] == []


def test_merged_core_cocktail_checkpoint_round_trip(report, tensors):
    import torch

    ran(report, "merged")
    assert_pair_equal(tensors, "merged_state")
    assert_pair_equal(tensors, "merged_generate")
    assert not torch.equal(tensors["merged_vs_tuned/a/q"], tensors["merged_vs_tuned/b/q"])
    assert "merge_manifest.json" in report["files"]["fac-tiny-merged"]
    merged_card = report["cards"]["fac-tiny-merged"]
    assert "## Core-Cocktail merge" in merged_card and "0.5 * M1 + 0.5 * M0" in merged_card
    assert "- core-cocktail" in merged_card.split("---")[1]
    assert 'from_pretrained("' + report["user"] + '/fac-tiny-merged"' in merged_card
    assert "generated by fun_audio_chat" in report["cards"]["fac-tiny-tuned"]
    assert "README.md" not in report["tuned_dir_files_after_push"]  # the user's folder was not modified
    assert report["cards"]["fac-tiny-own-card"] == "# My own card\n"


def test_missing_repo_error_is_clear(report):
    ran(report, "missing_repo")
    error = report["missing_repo_error"]
    assert error is not None, "loading a missing repo raised nothing"
    assert error["type"] == "OSError" and f"{report['user']}/does-not-exist" in error["message"]


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
