"""The voice page in a real browser: headless Debian Chromium with a fake microphone playing a spoken question
(looped), against ``fun-audio-chat serve`` started as a subprocess. The page must detect the turn, show the reply
text, play reply audio chunks, stop a reply when the user speaks again (barge-in) and answer a typed turn.

Needs ``apt-get install -y chromium chromium-driver`` (``make test`` installs them where the machine allows it) and
selenium from the test extra. Without them the test skips, saying how to enable it; with
``FUN_AUDIO_CHAT_REQUIRE_BROWSER=1`` (set by ``.ci/run``) it fails instead, so CI never skips it silently.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fun_audio_chat.processing import example_audio_path

from .conftest import serve_subprocess

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FUN_AUDIO_CHAT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FUN_AUDIO_CHAT_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = "install them with: apt-get install -y chromium chromium-driver (Debian), pip install selenium"


REQUIRED = os.environ.get("FUN_AUDIO_CHAT_REQUIRE_BROWSER") == "1"


def _missing(reason: str):
    if REQUIRED:  # CI: a browser test that cannot run is a failure
        pytest.fail(f"{reason}; {INSTALL_HINT} (FUN_AUDIO_CHAT_REQUIRE_BROWSER=1 forbids skipping)")
    pytest.skip(f"{reason}; {INSTALL_HINT}, or run `make browser` as root, then run the tests again")


def _require_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        _missing(f"the browser test needs headless Chromium and chromedriver, missing {missing}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("the browser test needs selenium")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``fun-audio-chat serve`` with its defaults (tiny model, tiny detokenizer) on a free port."""
    with open(tmp_path_factory.mktemp("serve") / "serve.log", "w+") as log:
        with serve_subprocess(["--max-new-tokens", "16"], log, timeout=120) as (url, health):
            yield url, health


@pytest.fixture
def microphone_wav(tmp_path) -> Path:
    """What Chromium's fake microphone plays (looped): the bundled question, 1.2 s of silence (the turn ends after
    0.7 s of it), the question again (it starts while the reply is on its way: a barge-in), then 8 s of silence
    for the second reply to stream and play."""
    speech, rate = sf.read(example_audio_path(), dtype="float32")

    def silence(seconds):
        return np.zeros(int(rate * seconds), dtype=np.float32)

    path = tmp_path / "microphone.wav"
    sf.write(path, np.concatenate([silence(0.5), speech, silence(1.2), speech, silence(8)]), rate, subtype="PCM_16")
    return path


@pytest.fixture
def browser(microphone_wav):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,820",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which(CHROMEDRIVER)))
    yield driver
    driver.quit()


def _counter(driver, name: str) -> int:
    return int(driver.execute_script(f"return document.body.dataset.{name} || '0'"))


def _status(driver) -> str:
    return driver.execute_script("return document.body.dataset.status || ''")


def _wait(driver, what: str, condition, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(str(entry) for entry in driver.get_log("browser"))
            status = driver.execute_script("return JSON.stringify(document.body.dataset)")
            pytest.fail(f"timed out waiting for {what}; page state {status}; console:\n{logs}")
        time.sleep(0.2)


def test_voice_page_turn_detection_reply_audio_barge_in_and_typed_turn(served, browser, artifacts_dir, tmp_path):
    from selenium.webdriver.common.by import By

    url, health = served
    browser.get(url + "/")
    _wait(browser, "the model name", lambda: "tiny" in browser.find_element(By.ID, "model").text, 30)
    browser.find_element(By.ID, "start").click()

    # spoken turns: detected by voice activity; the second starts while the first reply is on its way (barge-in)
    _wait(browser, "two detected spoken turns", lambda: _counter(browser, "utterances") >= 2)
    _wait(browser, "a barge-in", lambda: _counter(browser, "bargeIns") >= 1)
    assert browser.find_elements(By.CSS_SELECTOR, ".turn.assistant.interrupted")
    _wait(browser, "the reply to the second spoken turn", lambda: _counter(browser, "turns") >= 1)
    for user_turn in browser.find_elements(By.CSS_SELECTOR, ".turn.user")[:2]:
        assert user_turn.text.startswith("(spoken)") and user_turn.text.endswith("s of speech")
        # the clip (3.4 s) plus the kept lead-in and the closing silence
        assert 3.4 <= float(user_turn.text.split()[1]) <= 5.0

    # The looping fake microphone keeps starting turns, so the first answered turn may still be streaming (or be one
    # the random tiny model answered without words, its history depending on when the barge-in landed): wait for an
    # answered turn that shows its reply text.
    def shown_replies():
        texts = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant:not(.interrupted) .text")
        return [t.text for t in texts if t.text.strip()]

    _wait(browser, "an answered turn showing its reply text", shown_replies, 60)

    # a turn's timings are written when its stream ends; the looping fake microphone keeps starting turns, so look
    # for an answered turn that received both text and audio while it was the current reply
    def timed_turns():
        metas = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant:not(.interrupted) .meta")
        return [m.text for m in metas if "first text" in m.text and "first audio" in m.text]

    _wait(browser, "an answered turn with first-text and first-audio timings", lambda: timed_turns(), 60)
    assert health["speech"], "fun-audio-chat serve with no arguments must answer with speech"
    _wait(browser, "a played audio chunk", lambda: _counter(browser, "chunksPlayed") >= 1)

    # typed turn (voice detection off so the looping microphone does not interrupt it), once the reply has played.
    # Switch while the looping microphone is mid-utterance: the page must close that turn, not stay "hearing" forever.
    _wait(browser, "the microphone hearing a turn", lambda: _status(browser) == "hearing")
    browser.execute_script("document.getElementById('mode').value = 'ptt'")
    _wait(browser, "the end of the reply's audio", lambda: browser.find_element(By.ID, "status").text == "listening")
    turns_before = _counter(browser, "turns")
    browser.find_element(By.ID, "text-input").send_keys("Hello from the keyboard")
    browser.find_element(By.ID, "send").click()
    _wait(browser, "the reply to the typed turn", lambda: _counter(browser, "turns") > turns_before)
    assert browser.find_elements(By.CSS_SELECTOR, ".turn.user")[-1].text == "Hello from the keyboard"
    # answered: its words, or (a random tiny model may answer a history without printable words) its audio timing
    reply = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
    words = reply.find_element(By.CSS_SELECTOR, ".text").text.strip()
    assert words or "first audio" in reply.find_element(By.CSS_SELECTOR, ".meta").text
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn.error")

    shot = artifacts_dir / "voice_page.png"
    browser.save_screenshot(str(shot))
    browser.save_screenshot(str(tmp_path / "voice_page.png"))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
