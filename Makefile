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

# The compiled modules' sources (setup.py's COMPILED): an edit rebuilds them.
COMPILED_SOURCES := $(foreach m,gearoffload/client gearoffload/connection gearoffload/worker \
		gearoffload_server/state,$(m).py $(m).pxd)

$(STAMP): setup.cfg setup.py pyproject.toml gearoffload/_codec.c $(COMPILED_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,flask]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	PORT=$(PORT) $(PY) -m examples.flask_app.demo

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
		gearoffload_server/_build.py gearoffload/client.c gearoffload/connection.c \
		gearoffload/worker.c gearoffload_server/state.c
