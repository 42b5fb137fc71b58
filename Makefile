# make run   - create .venv, install llmos, fetch the default model once, generate text
# make test  - same set-up plus system packages (scripts/system-deps.sh) and test dependencies, then the whole test suite
# make bench - llmos beside its peers, printed as ratios and written to bench/results/
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test bench bench-deps clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/python -m llmos.engine.native  # compile the native decode step once (g++, ~20 s); optional
	$(BIN)/python -m llmos.engine.gguf_kernels  # and the GGUF block kernels (the gguf form, auto for Gemma 3); optional
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/llmos pull smollm2-135m-instruct
	$(BIN)/llmos generate "LLMOS is a" --max-new-tokens 50

# chromium, g++ and python3-dev from apt-get when root and missing; names them otherwise
system-deps:
	PYTHON=$(PYTHON) scripts/system-deps.sh

test: system-deps $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.run

# llama-cpp-python built for this CPU: AVX-512 on, AMX off (AMX instructions die with SIGILL here).
bench-deps: $(VENV)/.installed-test
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
	$(BIN)/pip install uvicorn fastapi pydantic-settings sse-starlette "starlette-context>=0.3.6,<0.4" PyYAML  # its server

clean:
	rm -rf $(VENV) build *.egg-info
