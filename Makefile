# dsee-cli developer targets. `make install` and `make test` are the README's two set-up commands.
PY ?= python3
export HF_HUB_OFFLINE ?= 1

PROFILE ?= paper
EXPERIMENTS := table1 table2 table4 table3 table5 table6 table7 table9 table12 table13 table14 fig2 pst-table2 pst-table4 pst-table5

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

# make reproduce-table1 [PROFILE=smoke|mini|paper] [LAUNCHER=joblib|slurm]: the sweep as the paper
# ran it (joblib: local processes; slurm: a cluster through submitit), then its report.
LAUNCHER ?=
reproduce-%:
	dsee train -m experiment=$* profile=$(PROFILE) $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER))
	dsee report multirun/$*
