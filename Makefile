# The two commands: `make test` and `make demo`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 4730
FUZZ_SECONDS ?= 60
STRESS_SECONDS ?= 30
SOAK_SECONDS ?= 60

.PHONY: test demo bench lint clean fuzz stress soak

# The compiled modules: each .py with a .pxd beside it (setup.py). An edit rebuilds them.
COMPILED_PXD := $(wildcard gearoffload/*.pxd gearoffload_server/*.pxd)
COMPILED_SOURCES := $(COMPILED_PXD) $(COMPILED_PXD:.pxd=.py)

$(STAMP): setup.cfg setup.py pyproject.toml gearoffload/_codec.c $(COMPILED_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,flask]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Most tests wait on server processes and sockets, not the CPU: four at a time (pytest-xdist).
# Tests marked slow skip locally and run under CI=true (or: make test PYTEST_ARGS=--run-slow).
TEST_JOBS ?= 4
test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_JOBS) $(PYTEST_ARGS)

# exec: the demo replaces the recipe's shell, so the SIGTERM make sends its child on
# `kill -TERM <make>` reaches the demo (a shell in between died and orphaned it).
demo: $(STAMP)
	PORT=$(PORT) exec $(PY) -m examples.flask_app.demo

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Robustness (issue #6): atheris is optional (the harnesses fall back to a random loop).
fuzz: $(STAMP)
	$(PY) -m pip install -q atheris || echo "atheris not installable: plain random loop"
	$(PY) fuzz/fuzz_decoder.py -max_total_time=$(FUZZ_SECONDS)
	$(PY) fuzz/fuzz_admin.py -max_total_time=$(FUZZ_SECONDS)

stress: $(STAMP)
	$(PY) benchmarks/stress.py --seconds $(STRESS_SECONDS)

# Healthy clients beside the hostile ones of issue #17 (docs/operations.md).
soak: $(STAMP)
	$(PY) benchmarks/soak_hostile.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	rm -f gearoffload/*.so gearoffload_server/*.so gearoffload/_build.py \
		gearoffload_server/_build.py $(COMPILED_PXD:.pxd=.c)
