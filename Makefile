# Demucs (v3 Hybrid, v4 Hybrid Transformer): install, test, demo, benchmarks.
#   make install   .venv with torch 2.13.0 (CPU build from the local wheel cache), the
#                  requirements, the package (editable) with its ONNX extras (onnx,
#                  openvino: the runtimes of `demucs --backend`), ffmpeg and soundstretch
#   make test      install, then ruff, mypy and the test suite (with a coverage summary):
#                  here without the long end-to-end tests (marked `slow`, ~10 min left);
#                  all of them with CI=true (as .ci/run does) or `make test-all`
#   make demo      the README's main command: synthetic data, `dora run` trains a tiny
#                  model, `tools.export` exports it, `demucs` separates a test track
#   make demo-v4   the same with a tiny Hybrid Transformer Demucs (v4)
#   make bench     every benchmark under bench/
#   make gpu-check on a machine with a CUDA GPU: the GPU tests and training-step figures

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO := demo
PYTEST_ARGS ?=
# The long end-to-end tests (`@pytest.mark.slow`) run on CI (CI=true) and in `make test-all`.
SLOW ?= $(if $(filter true 1,$(CI)),1,)
PYTEST_MARKS := $(if $(SLOW),,-m "not slow")

.PHONY: install system-deps test test-all lint typecheck pytest demo demo-v4 bench gpu-check clean-demo

install: $(STAMP) system-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch first and pinned, so that nothing else pulls a (multi-GB) CUDA build.
$(STAMP): $(PY) requirements.txt requirements_minimal.txt setup.py
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install -e ".[onnx,openvino]" torch==2.13.0
	touch $(STAMP)

# ffmpeg reads audio for the `demucs` command, soundstretch does the repitch augmentation.
system-deps:
	@if command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null \
			&& command -v soundstretch >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "Install ffmpeg and soundstretch (SoundTouch) with your package manager."; \
		if [ -n "$${CI:-}" ]; then exit 1; else exit 0; fi; fi; \
	SUDO=; if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
	echo "Installing ffmpeg and soundstretch with apt-get"; \
	$$APT install -y -q ffmpeg soundstretch \
		|| { $$APT update -q && $$APT install -y -q ffmpeg soundstretch; }

lint: install
	$(VENV)/bin/ruff check demucs tools tests bench

typecheck: install
	$(VENV)/bin/mypy demucs tools tests bench

# The coverage summary covers the package and tools/ as run by pytest itself (commands
# run in subprocesses are not counted); its data file stays in the venv.
# The 25 slowest tests are listed at the end (where a slow CI run spends its time).
pytest: install
	COVERAGE_FILE=$(VENV)/.coverage $(PY) -m pytest --cov=demucs --cov=tools --cov-report=term \
		--durations=25 $(PYTEST_MARKS) $(PYTEST_ARGS)

test: lint typecheck pytest

test-all:
	$(MAKE) test SLOW=1

demo: install
	$(PY) -m tools.demo --root $(DEMO)

demo-v4: install
	$(PY) -m tools.demo --root $(DEMO) --model htdemucs

bench: install
	@mkdir -p bench/results
	@found=0; for script in bench/bench_*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script"; $(PY) "$$script" || exit 1; \
	done; [ $$found = 1 ] || echo "No benchmark under bench/ yet (see bench/README.md)."

gpu-check: install
	PYTHON=$(PY) bash bench/gpu_check.sh

clean-demo:
	rm -rf $(DEMO)
