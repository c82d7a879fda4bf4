# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make demo   runs the main job on the embedded default (zoo:resnet20-fmnist on Fashion-MNIST)
#   make test   runs the test suite
# Both go through `make install`, which is idempotent.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install demo test bench clean data aarch64

install: $(STAMP) data aarch64

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (cwhawq needs Python 3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[tvm,dev]"
	touch $(STAMP)

data:
	@if ls $(DATA_DIR)/train-images-idx3-ubyte.gz >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
	  { echo "error: could not install the Debian package dataset-fashion-mnist; install it or set CWHAWQ_DATA to a directory of Fashion-MNIST IDX files"; exit 2; }; \
	else \
	  echo "note: Fashion-MNIST not found in $(DATA_DIR): run 'sudo apt-get install dataset-fashion-mnist' or set CWHAWQ_DATA (tests that need it will skip)"; \
	fi

# aarch64: the cross compiler and qemu-user (Debian packages, installed as root when either is
# missing) and the aarch64 TVM runtime libraries unpacked from the registry's aarch64 wheels of the
# pinned apache-tvm / apache-tvm-ffi (tools/fetch_tvm_runtime.py, a no-op when up to date), so that
# the qemu-user run test in tests/test_tvm_backend.py runs. CWHAWQ_SKIP_AARCH64=1 skips all of it
# (and the aarch64 tests skip); otherwise a missing piece makes those tests fail.
aarch64: $(STAMP)
	@if [ "$$CWHAWQ_SKIP_AARCH64" = 1 ]; then echo "note: CWHAWQ_SKIP_AARCH64=1: aarch64 tools not installed, aarch64 tests will skip"; exit 0; fi; \
	if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null)) || \
	    { echo "error: could not install the Debian packages g++-aarch64-linux-gnu qemu-user (set CWHAWQ_SKIP_AARCH64=1 to go without aarch64 tests)"; exit 2; }; \
	  else \
	    echo "note: g++-aarch64-linux-gnu or qemu-user missing: run 'sudo apt-get install g++-aarch64-linux-gnu qemu-user' (the aarch64 tests fail without them unless CWHAWQ_SKIP_AARCH64=1)"; \
	  fi; \
	fi; \
	$(PY) tools/fetch_tvm_runtime.py

demo: install
	$(VENV)/bin/cwhawq demo

# the suite runs its files on one pytest-xdist worker per core (TEST_JOBS=1: one process)
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
test: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

# speed and accuracy measurements (long; each writes its table under docs/)
bench: install
	$(PY) benchmarks/bench_hessian.py
	$(PY) benchmarks/plan_results.py --finetune-epochs 1
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_gemv.py
	$(PY) benchmarks/bench_resnet20.py
	$(PY) benchmarks/bench_vs_onnxruntime.py --also-avx2
	$(PY) benchmarks/bench_latency.py

clean:
	rm -rf $(VENV) build *.egg-info
