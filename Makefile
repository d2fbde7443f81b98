# The two commands of the README: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ORCH   := $(VENV)/bin/orch
# torch 2.13.0 lies on this machine's disk as a CPU wheel; installing it first means the
# project's torch range is already met and pip never pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The search, then the family B0..B3 from its winner (a short φ list: this runs on 2 CPU cores).
demo: venv
	$(ORCH) search --trials 8 --epochs 3
	$(ORCH) scale --from-run latest --phis 1-3

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) orch-runs .pytest_cache
