"""``fun-audio-chat serve --voice NAME=CLIP --voice NAME=VOICE_FILE`` as a subprocess: the clip is cloned at start-up,
``GET /v1/voices`` lists both, and the page's voice picker offers them and answers a typed turn in the chosen voice
(headless Chromium, as in test_browser.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from .conftest import free_port, serve_subprocess, speech_like
from .test_browser import CHROMEDRIVER, CHROMIUM, _counter, _require_browser, _wait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_with_voices(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("kaldi_native_fbank")
    from fun_audio_chat.voices import tiny_voice_cloner

    work = tmp_path_factory.mktemp("voice_picker")
    sf.write(work / "anna.wav", speech_like(3.5, 150), 16000)
    tiny_voice_cloner().clone(speech_like(3.0, 230), name="bert", sampling_rate=16000).save(work / "bert.safetensors")
    voices = ["--voice", f"anna={work / 'anna.wav'}", "--voice", f"bert={work / 'bert.safetensors'}"]
    with open(work / "serve.log", "w+") as log:
        with serve_subprocess(["--max-new-tokens", "12", *voices], log) as (url, _):
            yield url, log


def test_serve_registers_the_voices_given(served_with_voices):
    url, log = served_with_voices
    with urllib.request.urlopen(f"{url}/v1/voices", timeout=30) as response:
        listed = json.loads(response.read())
    assert [voice["id"] for voice in listed["data"]] == ["default", "anna", "bert"]
    assert listed["data"][1]["prompt_seconds"] == pytest.approx(3.5, abs=0.05)  # the clip, cloned at start-up
    log.seek(0)
    assert "in voices default, anna, bert" in log.read()


def test_the_page_picker_offers_the_voices_and_speaks_in_the_chosen_one(served_with_voices):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _ = served_with_voices
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which(CHROMEDRIVER)))
    try:
        driver.get(url + "/")
        picker = lambda: Select(driver.find_element(By.ID, "voice"))  # noqa: E731
        _wait(driver, "the voice picker", lambda: len(picker().options) == 3, 30)
        assert [option.get_attribute("value") for option in picker().options] == ["default", "anna", "bert"]
        assert picker().first_selected_option.get_attribute("value") == "default"
        picker().select_by_value("anna")
        driver.execute_script(  # record the request bodies the page sends
            "const original = window.fetch; window.__bodies = [];"
            "window.fetch = (url, init) => { if (init && init.body) window.__bodies.push(init.body);"
            " return original(url, init); };"
        )
        driver.find_element(By.ID, "text-input").send_keys("Hello in another voice")
        driver.find_element(By.ID, "send").click()
        _wait(driver, "the reply to the typed turn", lambda: _counter(driver, "turns") >= 1, 90)
        sent = [json.loads(body) for body in driver.execute_script("return window.__bodies")]
        assert sent and sent[-1]["audio"] == {"voice": "anna", "format": "pcm16"}
        assert not driver.find_elements(By.CSS_SELECTOR, ".turn.error")
        reply = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
        assert "first audio" in reply.find_element(By.CSS_SELECTOR, ".meta").text  # spoken, in anna's voice
    finally:
        driver.quit()


def test_a_bad_voice_stops_serve_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fun_audio_chat.cli", "serve", "--port", str(free_port())]
        + ["--voice", f"anna={tmp_path / 'missing.wav'}"],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"),
        cwd=Path(tmp_path),
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines == [
        f"fun-audio-chat serve: error: --voice anna={tmp_path / 'missing.wav'}: voice anna: "
        f"{tmp_path / 'missing.wav'} not found (an audio clip or a .safetensors voice file)."
    ]
