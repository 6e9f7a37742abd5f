# Two commands on a fresh machine: `make demo` and `make test`. Both (re)build .venv when
# pyproject.toml or constraints.txt changed, installing the exact versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Quiet, deterministic Ray for local runs and CI (see ../shared/RAY_NOTES.md).
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0

.PHONY: install browser demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: left to the resolver it would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jointray demo --config configs/synthetic.yaml

# Headless Chromium and its driver for the web viewer's test (Debian packages; installed when missing and
# when we may: as root, as on CI. Elsewhere the viewer test says it skipped, except under CI=true).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing: install Debian's chromium and chromium-driver for the viewer test"; fi

test: $(STAMP) browser
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest

# Throughput first (minutes), then the accuracy runs (20 min of training on MSD, the plain MONAI loop
# for 3.5 + 10 + 20 min; 4 x 5 min synthetic;
# the ablation grid and search, about an hour; 5 x 5 min on MSD with semi-synthetic outcomes).
bench: $(STAMP)
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/accuracy_msd.py
	$(BIN)/python benchmarks/plain_monai.py
	$(BIN)/python benchmarks/joint_learning.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/tune.py
	$(BIN)/python benchmarks/ablation.py
	$(BIN)/python benchmarks/joint_real.py

clean:
	rm -rf $(VENV) runs benchmarks/results
