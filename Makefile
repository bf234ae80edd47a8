PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench cluster-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a looser pin would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distq train configs/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

# As root: cluster/local.yaml launched against this machine over ssh (scripts/cluster_smoke.py). Not part of `test`:
# it installs Debian packages, adds a user, starts an ssh server and takes minutes.
cluster-smoke: $(STAMP)
	$(BIN)/python scripts/cluster_smoke.py

clean:
	rm -rf $(VENV) runs
