# The front door: `make demo` runs the main job, `make test` runs the tests. Both set up the
# virtual environment first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama-cpp-python compiles llama.cpp from source. The build is a deliberate choice:
#   generic (default)  -DGGML_NATIVE=OFF: AVX2/FMA/F16C on x86-64 (every x86-64 CPU since
#                      2013-2015, with or without AVX-512), plain NEON on arm64
#   native             -march=native: fastest on this CPU, may crash on another one
#   sse42              SSE4.2 only (128-bit SIMD, as wide as NEON): old x86-64 CPUs, and the
#                      other kernel path `make test-kernels` runs
# pip caches wheels it built by source URL alone, whatever the build flags, so a native wheel
# built on one machine would be reused on another. The wheel is built here instead, once per
# version, architecture and build (native builds also per CPU), into a folder of its own.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_BUILD ?= generic
LLAMA_CMAKE_generic := -DGGML_NATIVE=OFF
LLAMA_CMAKE_native := -DGGML_NATIVE=ON
LLAMA_CMAKE_sse42 := -DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF \
	-DGGML_F16C=OFF -DGGML_BMI2=OFF
CPU_KEY = $(if $(filter native,$(LLAMA_BUILD)),-$(shell grep -m1 -E '^(flags|Features)' \
	/proc/cpuinfo 2>/dev/null | cksum | cut -d' ' -f1))
WHEELS_ROOT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/edgeft/wheels
wheels_for = $(WHEELS_ROOT)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell uname -m)-$(1)
WHEELS = $(call wheels_for,$(LLAMA_BUILD))$(CPU_KEY)

.PHONY: install llama-wheel demo test test-kernels lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build these machines carry; an open range would
	# pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(MAKE) --no-print-directory llama-wheel
	$(PY) -m pip install --quiet $(WHEELS)/llama_cpp_python-*.whl
	# the optimum extra: --graph optimum (optimum-onnx, which requires transformers 4.57)
	$(PY) -m pip install --quiet -e '.[dev,onnx,optimum]'
	touch $(STAMP)

install: $(STAMP)

# Build the llama-cpp-python wheel for LLAMA_BUILD unless it is already built.
llama-wheel:
	@if [ -z "$(LLAMA_CMAKE_$(LLAMA_BUILD))" ]; then \
		echo "LLAMA_BUILD=$(LLAMA_BUILD): choose generic, native or sse42" >&2; exit 2; fi
	@if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "llama-cpp-python $(LLAMA_CPP_VERSION) ($(LLAMA_BUILD)): $(WHEELS)"; else \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) ($(LLAMA_BUILD)): minutes"; \
		rm -rf $(WHEELS).partial && mkdir -p $(WHEELS).partial && \
		CMAKE_ARGS="$(LLAMA_CMAKE_$(LLAMA_BUILD))" $(PY) -m pip wheel --quiet --no-deps \
			--no-cache-dir --wheel-dir $(WHEELS).partial \
			'llama-cpp-python==$(LLAMA_CPP_VERSION)' && \
		rm -rf $(WHEELS) && mv $(WHEELS).partial $(WHEELS); fi

demo: $(STAMP)
	$(VENV)/bin/edgeft demo --force

test: $(STAMP)
	$(PY) -m pytest

# The tests that compare floats across runtimes, kernels and computation orders, again on other
# kernel paths than this machine picks: llama.cpp built for SSE4.2 only, torch (and
# bitsandbytes, which follows torch's choice) on ATen's default kernels, oneDNN capped at
# SSE4.1, MKL at SSE4.2. onnxruntime has no switch: MLAS picks its kernels from the CPU alone.
KERNEL_TESTS := tests/test_gguf.py tests/test_runtime_llamacpp.py tests/test_train_merge.py \
	tests/test_onnx.py tests/test_runtime_onnx.py tests/test_bench.py tests/test_c_consumer.py \
	tests/test_architectures.py
test-kernels: $(STAMP)
	$(MAKE) --no-print-directory llama-wheel LLAMA_BUILD=sse42
	rm -rf build/llama-sse42
	$(PY) -m pip install --quiet --no-deps --target build/llama-sse42 \
		$(call wheels_for,sse42)/*.whl
	PYTHONPATH=build/llama-sse42 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 \
		MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PY) -m pytest $(KERNEL_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check edgeft export runtimes devices tests benchmarks

clean:
	rm -rf $(VENV) edgeft-demo build *.egg-info
