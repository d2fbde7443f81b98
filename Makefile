# The two commands of the README: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ORCH   := $(VENV)/bin/orch
# torch 2.13.0 lies on this machine's disk as a CPU wheel; installing it first means the
# project's torch range is already met and pip never pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The search, then the family B0..B2 from its winner, sized for 2 CPU cores: 4 trials and the
# confirmation of the top 2 on a smaller synthetic task at batch 16 (lr 0.03: the default 0.1 at
# 64, scaled linearly), with B0 at 36 px, where the fine class of each pair is just below B0's
# Nyquist limit, so what the members' resolution adds can show (B0 at 40 px reached 0.96-0.98 in
# two seeds, at 36 0.77-0.99 in five); the scale inherits the search's data, epochs, batch and
# rate. Measured, with what it does not yet show: README, "The demo's family".
demo: venv
	$(ORCH) search --trials 4 --confirm-top 2 --base-resolution 36 --synthetic-size 1024 512 --batch-size 16 --lr 0.03
	$(ORCH) scale --from-run latest --phis 1-2

# The MLflow UI test renders pages in headless Chromium: Debian's package, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { s=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$s apt-get update -qq && $$s apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: could not install chromium (apt-get install chromium); the MLflow UI test will fail" >&2

test: venv browser
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) orch-runs .pytest_cache
