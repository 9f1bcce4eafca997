# allconv — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARRAYS  ?= data/cifar10-jpeg-arrays.npz
JPEG    ?= ../shared/data/cifar10-jpeg.npz
ARGS    ?=

.DEFAULT_GOAL := help
.PHONY: help install train train-jpeg test test-system test-slow test-slurm slurm lint bench data-jpeg lr-study clean

help:  ## this list
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install allconv with everything it needs (torch included)

train: $(STAMP)  ## the main job: All-CNN-C, paper recipe, CIFAR-10 (ARGS="optim.lr=0.1 ..." to change)
	$(BIN)/python src/train.py $(ARGS)

$(ARRAYS):
	@test -f $(JPEG) || { echo "error: $(JPEG) not found; pass JPEG=<path to cifar10-jpeg.npz>"; exit 2; }
	$(BIN)/python $(dir $(JPEG))cifar10_jpeg_to_arrays.py $(ARRAYS)

data-jpeg: $(STAMP) $(ARRAYS)  ## decode the JPEG copy of CIFAR-10 into $(ARRAYS)

train-jpeg: $(STAMP) $(ARRAYS)  ## experiment=quick_cpu on the JPEG CIFAR-10 copy (CPU, about 6 min on 2 cores)
	$(BIN)/python src/train.py experiment=quick_cpu data.path=$(ARRAYS) $(ARGS)

test: $(STAMP)  ## the test suite (CPU, 2 workers: about 5.5 min on 2 cores (324 s, 2026-12-08); each test times out after 300 s; the 10 slowest listed); the end-to-end runs are make test-system
	$(BIN)/python -m pytest -q -n 2 --durations=10 $(ARGS)

test-system: $(STAMP)  ## whole runs end to end in several processes: DDP, SIGTERM and resume, a relaunched sweep, launchers, a compile, run identity and continuations (about 5.5 min: 318 s, 2026-12-08)
	$(BIN)/python -m pytest -q -n 2 -m system $(ARGS)

test-slow: $(STAMP)  ## only the slow checks (the quick_cpu claim: ~15 min; 1 h timeout per test)
	$(BIN)/python -m pytest -q -m slow --timeout 3600 $(ARGS)

slurm:  ## install (apt, as root) and start a one-node SLURM cluster on this machine (scripts/slurm_local.sh)
	$(if $(filter 0,$(shell id -u)),,sudo) bash scripts/slurm_local.sh

test-slurm: $(STAMP) slurm  ## the SLURM checks on that cluster: requeue, USR2, DDP, a refused submission (about 3 min: 173 s, 2026-12-08)
	ALLCONV_SLURM_REQUIRED=1 $(BIN)/python -m pytest -q -m slurm $(ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)  ## throughput of the 12 networks, Lightning path vs a plain loop -> outputs/bench (ARGS="--out benchmarks/results" for the docs)
	$(BIN)/python benchmarks/bench.py $(ARGS)

LR_STUDY ?= multirun/lr_study_cpu/$(shell date +%Y-%m-%d_%H-%M-%S)
lr-study: $(STAMP) $(ARRAYS)  ## lrs 0.25-0.01 with the update cap, 0.05 without (CPU, ~1 h) -> docs/RESULTS.md
	$(eval LR_STUDY := $(LR_STUDY))
	$(BIN)/python src/train.py experiment=lr_study_cpu data.path=$(ARRAYS) hydra.sweep.dir=$(LR_STUDY) $(ARGS)
	$(BIN)/python src/train.py experiment=lr_study_cpu data.path=$(ARRAYS) hydra.sweep.dir=$(LR_STUDY) \
	  optim.lr=0.05 optim.max_update_norm=null $(ARGS)
	$(BIN)/python src/report.py $(LR_STUDY) --curves --md docs/RESULTS.md --png docs/figures/lr_study_curves.png

.PHONY: grid-cpu seed-study table-cpu
GRID ?= multirun/grid_cpu
GRID_SEEDS ?= 0,1,2
GRID_RUN = $(BIN)/python src/train.py experiment=grid_cpu data.path=$(ARRAYS) seed=$(GRID_SEEDS) hydra/launcher=local_parallel
grid-cpu: $(STAMP) $(ARRAYS)  ## the 48 (network, lr) cells x 3 seeds, 2 epochs of 10,000 images, with and without the cap (CPU, ~1 h; re-run to continue) -> $(GRID)/grid.md, grid.png
	$(GRID_RUN) optim.lr=0.25,0.1 hydra.sweep.dir=$(GRID)/cap_high $(ARGS)
	$(GRID_RUN) optim.lr=0.25,0.1 optim.max_update_norm=null hydra.sweep.dir=$(GRID)/nocap $(ARGS)
	$(GRID_RUN) optim.lr=0.05,0.01 hydra.sweep.dir=$(GRID)/cap_low $(ARGS)
	$(BIN)/python src/report.py $(GRID)/cap_high $(GRID)/cap_low $(GRID)/nocap --grid --md $(GRID)/grid.md --png $(GRID)/grid.png
	$(GRID_RUN) optim.lr=0.25 trainer.max_epochs=5 hydra.sweep.dir=$(GRID)/lr0.25_5epochs $(ARGS)
	$(BIN)/python src/report.py $(GRID)/lr0.25_5epochs --grid --md $(GRID)/lr0.25_5epochs.md --png $(GRID)/lr0.25_5epochs.png

SEEDS ?= multirun/seed_study
SEED_RUN = $(BIN)/python src/train.py experiment=grid_cpu data.path=$(ARRAYS) trainer.max_epochs=5 model.final_weights=zero,init
seed-study: $(STAMP) $(ARRAYS)  ## the two cells that decide the class layer's start, 8 seeds each, 5 epochs (CPU, ~25 min) -> $(SEEDS)/grid.md
	$(SEED_RUN) model=all_cnn_c optim.lr=0.25 seed=0,1,2,3,4,5,6,7 hydra.sweep.dir=$(SEEDS)/all_cnn_c_lr0.25 $(ARGS)
	$(SEED_RUN) model=convpool_cnn_a optim.lr=0.1 seed=0,1,2,3,4,5,6,7 hydra.sweep.dir=$(SEEDS)/convpool_cnn_a_lr0.1 $(ARGS)
	$(SEED_RUN) model=all_cnn_c optim.lr=0.25 optim.max_update_norm=null seed=0,1,2,3 \
	  hydra.sweep.dir=$(SEEDS)/all_cnn_c_lr0.25_nocap $(ARGS)
	$(BIN)/python src/report.py $(SEEDS)/all_cnn_c_lr0.25 $(SEEDS)/convpool_cnn_a_lr0.1 $(SEEDS)/all_cnn_c_lr0.25_nocap --grid \
	  --md $(SEEDS)/grid.md --png $(SEEDS)/grid.png

TABLE ?= multirun/table_cpu
table-cpu: $(STAMP) $(ARRAYS)  ## the 12 networks at width 0.25, 20 epochs, lr 0.05, and the augmented All-CNN-C (CPU, hours; re-run to continue) -> $(TABLE)/report.md
	$(BIN)/python src/train.py experiment=table_cpu data.path=$(ARRAYS) hydra.sweep.dir=$(TABLE)/plain $(ARGS)
	$(BIN)/python src/train.py experiment=table_cpu data.path=$(ARRAYS) hydra.sweeper.params.model=all_cnn_c \
	  data.augment=true hydra.sweep.dir=$(TABLE)/augmented $(ARGS)
	$(BIN)/python src/report.py $(TABLE)/plain $(TABLE)/augmented --out $(TABLE)

clean:  ## remove outputs (not the venv, not data)
	rm -rf outputs multirun .pytest_cache
