# One-command set-up and the project's main jobs. Everything runs inside .venv.
VENV := .venv
PY := $(VENV)/bin/python
WORKERS ?= 2
PHANTOMS ?= 192
DATASETS ?= $(or $(LIVER_D2_DATASETS),datasets)
# Python 3.10 (pinned in .python-version): through pyenv when it is there, else on PATH.
PY310 := $(shell (pyenv which python3.10 2>/dev/null || command -v python3.10 2>/dev/null) | head -n 1)

.PHONY: setup demo data test bench clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	@if [ -z "$(PY310)" ] || ! "$(PY310)" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then \
	  echo "error: Python 3.10 not found (needed by the prebuilt detectron2 wheel). Install it with 'pyenv install 3.10.13' (pyenv.run), or your system's python3.10 package, then run 'make setup' again." >&2; \
	  exit 1; fi
	"$(PY310)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "from detectron2 import _C; import liver_d2; print('set-up ok: detectron2 with compiled ops')"
	touch $@

# Phantoms in the MSD layout, prepared as the registered liver_phantom_{train,val,test}.
data: setup
	$(PY) tools/make_phantoms.py --out $(DATASETS)/phantoms --num $(PHANTOMS) --workers $(WORKERS)
	$(PY) tools/prepare_data.py --source $(DATASETS)/phantoms --workers $(WORKERS)

demo: data
	$(PY) tools/train_net.py --config-file configs/demo/retinanet_R18_phantom_cpu.yaml

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_prepare.py

clean-data:
	rm -rf $(DATASETS)/phantoms $(DATASETS)/liver_phantom
