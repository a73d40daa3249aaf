# lorafit — set-up and checks. `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (a wheel on the CI machines' disk). A machine with a CUDA torch keeps its own.
TORCH_CPU ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all lint smoke clean

install:
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch found: the venv reuses it"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(BIN)/pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install --quiet -e ".[dev,serve]"
	@$(BIN)/python -c "import torch, transformers, lorafit; print(f'lorafit {lorafit.__version__}: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"

test:
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check lorafit tests scripts

# The quickstart end to end on the shipped tiny model (about a minute on 2 CPU cores), plus a big config's plan.
smoke:
	$(BIN)/lorafit validate configs/llama-8b-qlora.yaml
	rm -rf runs/smoke
	$(BIN)/lorafit train configs/tiny-quickstart.yaml output.dir=runs/smoke
	$(BIN)/lorafit eval runs/smoke
	$(BIN)/lorafit generate runs/smoke --prompt "Repeat the word twice: stone"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
