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

# The search, then the family B0..B2 from its winner, sized for 2 CPU cores: a smaller synthetic
# task, 2 epochs and batch 16 (measured at base 32: B0 reaches 0.45 top-1 this way, 0.34 at batch
# 32, in about the same time) at lr 0.03 (the default 0.1 at batch 64, scaled linearly); the scale
# inherits the search's data, epochs, batch and rate.
demo: venv
	$(ORCH) search --trials 4 --epochs 2 --synthetic-size 1024 256 --batch-size 16 --lr 0.03
	$(ORCH) scale --from-run latest --phis 1-2

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) orch-runs .pytest_cache
