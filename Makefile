# sdlearn: every task a contributor or a learner runs, one target each.
# `make demo` and `make test` set everything up on a fresh machine first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NBVAL := --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# Tests run on two workers, one thread each: the course's tensors are small, and
# two workers with two threads each would fight over a 2-core machine.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider -n 2

.PHONY: setup demo test test-fast test-notebooks test-laptop test-slow check \
        format notebooks execute reference latest book book-test chromium \
        readme-figure lab bench bench-deps clean

setup: $(STAMP)

# torch first, the CPU build, so nothing later pulls a newer or a CUDA one;
# the rest must keep it (sdlearn asks for a range 2.13.0 satisfies).
# constraints.txt holds the versions the reference tensors and the stored
# outputs were made with, so every machine tests the same libraries.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sdlearn tour --out outputs/shapes_grid.png
	$(VENV)/bin/sdlearn generate "a large red circle on the left" --out outputs/red_circle.png

# The README's test command: unit tests, then the notebooks in both forms.
test: setup test-fast test-notebooks

test-fast: setup
	$(PYTEST) tests

# --dist loadfile keeps every notebook's cells on one worker, in order
# Checks keep a passing answer in $SDLEARN_HOME/answers: test runs keep theirs in
# folders of their own, removed at the end, so a run leaves nothing behind and
# the chapters (unsolved, run by tests/test_chapters.py, each in a folder of its
# own) never see the answers the solutions kept.
IN_TEMP_HOME := home=$$(mktemp -d) && trap 'rm -rf "$$home"' EXIT && SDLEARN_HOME=$$home
test-notebooks: setup
	$(IN_TEMP_HOME) $(PYTEST) --dist loadfile --nbval $(NBVAL) solutions
	$(PYTEST) -m notebooks tests/test_chapters.py

# A learner's laptop: no AVX-512 and no AMX, one thread. Two notebooks at a time,
# each in its own process on one thread: a laptop each, side by side.
LAPTOP := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1
test-laptop: setup
	$(IN_TEMP_HOME) $(LAPTOP) $(PY) -m pytest -p no:cacheprovider -n 2 --dist loadfile \
		--nbval $(NBVAL) solutions

test-slow: setup
	$(PY) -m pytest tests -m slow

# Lint, format and drift checks: under a minute.
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/notebooks.py check

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate package cells in solutions/ and all of chapters/ (no execution).
notebooks: setup
	$(PY) tools/notebooks.py build

# Regenerate, then re-run the solution notebooks and store their outputs.
# The solutions keep their answers in .solution-answers/, so that chapter 06,
# executed alone, still draws with the answers chapters 01-05 kept.
execute: setup
	SDLEARN_HOME=$(CURDIR)/.solution-answers OMP_NUM_THREADS=1 \
		$(PY) tools/notebooks.py build --execute $(NB)

reference: setup
	$(PY) tools/make_reference.py

# The project against the newest versions its ranges allow, in .venv-latest
# (torch stays the CPU build): what moved in the reference tensors, then the
# unit tests and the notebooks. `make reference` and `make execute` in .venv
# bring the repository along once constraints.txt is updated.
LATEST := .venv-latest
latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	echo "torch==2.13.0" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --upgrade -c $(LATEST)/torch.txt -e '.[dev]'
	$(LATEST)/bin/python tools/check_latest.py
	OMP_NUM_THREADS=1 $(LATEST)/bin/python -m pytest -p no:cacheprovider -n 2 tests
	OMP_NUM_THREADS=1 $(LATEST)/bin/python -m pytest -p no:cacheprovider -n 2 \
		--dist loadfile --nbval $(NBVAL) solutions

book: setup
	$(PY) -m tools.build_book

# Builds the book, then opens every page in headless Chromium: fails on a request
# outside the site, an unrendered formula, a broken image, a console error, a
# shrunk figure or cut-off code (about a minute).
book-test: setup chromium
	$(PY) -m tools.build_book
	$(PY) -m tools.check_book

# Chromium from the system's packages (Debian/Ubuntu), for `make book-test`.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "make book-test needs Chromium: install it with your system's packages"; \
		echo "(Debian/Ubuntu: sudo apt-get install chromium), or put it on PATH."; \
		exit 1; \
	fi

# The README's picture and the book's icon, drawn by the shipped tiny model.
readme-figure: setup
	OMP_NUM_THREADS=1 $(PY) -m tools.make_readme_figure

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.allow_root=True chapters

# Speed against diffusers on a quiet machine: the UNet step (about 8 minutes),
# then chapter 10's fast path, a 512x512 image and the recipe's scores (about 25),
# then its later rungs: allocators, fused projections, merged tokens (about 10)
bench: setup bench-deps
	$(PY) tools/bench_unet.py
	$(PY) tools/bench_fast.py
	$(PY) tools/bench_rungs.py

# The allocators chapter 10's benchmark tries, from the system's packages
# (Debian/Ubuntu); without them it times the default allocator alone.
bench-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			libjemalloc2 libtcmalloc-minimal4; \
	else \
		echo "optional, for make bench: sudo apt-get install libjemalloc2"; \
		echo "libtcmalloc-minimal4 (Debian/Ubuntu); without them it skips them"; \
	fi

clean:
	rm -rf book/_build book/solutions outputs .pytest_cache $(LATEST)
