# dsee-cli developer targets. `make install` and `make test` are the README's two set-up commands.
PY ?= python3
export HF_HUB_OFFLINE ?= 1

PROFILE ?= paper
EXPERIMENTS := table1 table6 table12 fig2

.PHONY: install demo test lint bench $(addprefix reproduce-,$(EXPERIMENTS))

install:
	$(PY) -m pip install torch==2.13.0 || $(PY) -m pip install torch
	$(PY) -m pip install -e ".[test]"

demo:
	dsee train experiment=demo

test:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

lint:
	ruff check dsee_cli tests scripts

bench:
	$(PY) scripts/bench_omega.py
	$(PY) scripts/bench_train_step.py
	$(PY) scripts/bench_head_pruned.py

# make reproduce-table1 [PROFILE=smoke|mini|paper]: the sweep as the paper ran it, then its report.
reproduce-%:
	dsee train -m experiment=$* profile=$(PROFILE)
	dsee report multirun/$*
