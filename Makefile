# hpe-workbook: two commands on a fresh machine (README):
#   make workbook   set up .venv (+ the [peers] extra) and run the whole workbook on the embedded default
#   make test       set up .venv and run the tests (what CI runs)
# Set-up is idempotent: .venv is (re)installed only when pyproject.toml changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEERS  := $(VENV)/.peers
NAME   ?= default
PROFILE ?= default
EGL_DEBS := libegl1 libegl-mesa0 libgl1-mesa-dri
# OpenMP threads sleep instead of spinning while they wait: on 2 shared cores a spinning torch step
# took 20-28 s against 2.4-3.4 s (docs/tiny_backend.md). Set it yourself to override.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: system-deps setup peers workbook smoke test test-slow test-gpu lab readme bench clean-runs help

help:
	@sed -n '2,5p' Makefile

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 (CPU) is pinned in pyproject.toml: it lies on these machines' disk.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (hpe-workbook)" >/dev/null
	@touch $(STAMP)

# SynthHeads renders with OpenGL on EGL (Mesa's software rasteriser). Install the system
# libraries where we can (Debian, as root); otherwise hpelib.data.render names what is missing.
system-deps:
	@if command -v dpkg >/dev/null && ! dpkg -s $(EGL_DEBS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(EGL_DEBS) >/dev/null; \
	  else echo "note: SynthHeads needs: sudo apt-get install $(EGL_DEBS)"; fi; fi

setup: $(STAMP) system-deps

# The workbook's off-the-shelf baseline (MediaPipe FaceLandmarker, the `peers` extra). Optional:
# where no wheel installs, the run goes on without the `mediapipe` row and says so.
$(PEERS): $(STAMP)
	@$(PY) -m pip install --quiet -e '.[dev,peers]' && touch $(PEERS) || \
	  echo "note: the [peers] extra (mediapipe) did not install; the MediaPipe baseline will be skipped"

peers: $(PEERS)

workbook: setup peers
	$(PY) -m hpelib.workbook run --profile $(PROFILE) --name $(NAME)

smoke: setup
	$(PY) -m hpelib.workbook run --profile smoke --name smoke

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

# the checks that need a CUDA device (the default tier hides a GPU, so it checks what CI checks)
test-gpu: setup
	$(PY) -m pytest -m gpu -rA

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Refresh the README's results section from a finished run (never typed by hand);
# SECTION=pose fills the named section <!-- results:pose:start/end --> instead.
readme: setup
	$(PY) -m hpelib.report readme runs/$(NAME) $(if $(SECTION),--section $(SECTION))

bench: setup
	$(PY) -m hpelib.data.bench
	$(PY) -m hpelib.bench similarity

clean-runs:
	rm -rf runs/smoke
