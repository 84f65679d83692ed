# Two commands do all the set-up: `make demo` and `make test` create (or reuse) .venv with the pinned dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PARAMS ?= params/tiny.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test smoke-e4b qlora-demo lab bench tiny-base clean-notebooks check-notebooks

# Git runs filters from the top of the working tree, so the relative path serves every clone and worktree.
NBSTRIP := .venv/bin/python -m actionft.notebooks clean --stdin

setup: $(STAMP)  ## .venv, and the git filter that strips notebook outputs on `git add` (.gitattributes)
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git config filter.nbstrip.clean "$(NBSTRIP)" && git config filter.nbstrip.smudge cat && \
		echo "git filter nbstrip: notebooks/*.ipynb are committed without outputs"; fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job on the embedded default: notebooks in order, executed copies in outputs/<run>/
	$(BIN)/actionft run --params $(PARAMS)

# The notebooks first: the browser test then opens 05 with the adapter that 04 trained.
test: setup  ## every notebook re-executed by nbval + unit tests + the notebooks in JupyterLab
	$(BIN)/python -m pytest notebooks tests -m "not smoke and not qlora" --nbval-lax --nbval-current-env --durations=15

# tests/test_browser.py starts JupyterLab with these same arguments
LAB_ARGS := --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks
lab: setup  ## JupyterLab at the repository root, opened on notebooks/, with the project's environment
	$(BIN)/jupyter lab $(LAB_ARGS)

smoke-e4b: $(STAMP)  ## the reference recipe at E4B's full width (reduced depth, random weights) on the Kinetics-3K sample, on CPU (~4 min)
	$(BIN)/python -m pytest tests/test_smoke_e4b.py -m smoke -s -q

qlora-demo: $(STAMP)  ## the embedded run on a 4-bit base: train, evaluate on the full-precision base, check top-1 (15-40 min)
	$(BIN)/python -m pytest tests/test_qlora_demo.py -m qlora -s -q

bench: $(STAMP)  ## training throughput benchmark (tiny model on CPU; the real E4B architecture on a GPU)
	$(BIN)/python bench/bench_train.py

TINY_BASE := lib/actionft/assets/tiny-gemma4
# The packaged base is this recipe's result converted to the published structure (a tiny audio tower added, the
# release's flags set; text and vision weights unchanged); the recipe builds that structure from the start.
tiny-base: $(STAMP)  ## rebuild the packaged tiny base with the commands and seeds that made it (~60 min on 2 CPU cores)
	$(BIN)/actionft tiny-base --out $(TINY_BASE).new --steps 2000
	$(BIN)/actionft tiny-base --init $(TINY_BASE).new --out $(TINY_BASE).new --steps 1500 --lr 1e-3 --seed 1
	rm -f $(TINY_BASE).new/pretrain_history.json && rm -rf $(TINY_BASE) && mv $(TINY_BASE).new $(TINY_BASE)

clean-notebooks:  ## strip outputs and volatile metadata from the committed notebooks
	$(BIN)/python -m actionft.notebooks clean notebooks/*.ipynb

check-notebooks:  ## fail when what git would commit for a notebook carries outputs
	$(BIN)/python -m actionft.notebooks check --staged notebooks/*.ipynb

# The GPU benchmark on a lent, bare GPU machine (docs/benchmarks.md, "Running it on the GPU machine").
.PHONY: gpu-bundle gpu-rehearse gpu-merge
gpu-bundle:  ## the wheels the GPU machine lacks, into .gpu-bundle/ (carried with the tree); fails above 60 MiB in all
	$(PYTHON) bench/gpu_bundle.py

gpu-rehearse: gpu-bundle  ## bench/gpu_check.sh here on CPU, in a fresh venv shaped like the GPU image (tiny model)
	bash bench/gpu_rehearse.sh

gpu-merge:  ## add a GPU run to docs/benchmarks.json: make gpu-merge FROM=<the folder gpu_check.sh wrote>
	$(PYTHON) bench/gpu_records.py merge $(FROM)
