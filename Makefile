# lorafit — set-up and checks. `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (a wheel on the CI machines' disk). A machine with a CUDA torch keeps its own.
TORCH_CPU ?= torch==2.13.0
# CUDA_TORCH=yes: reuse $(PYTHON)'s torch even where it sees no GPU (where it does, install reuses it anyway)
CUDA_TORCH ?=
# Offline GPU machines: `make wheels` (where there is network) fills WHEELS; `make install` there takes packages from
# it (or from PIP_FIND_LINKS) and never asks an index. WHEEL_PYTHON: the GPU machine's Python; WHEEL_HAVE: its
# `python3 -m pip freeze` in a file, so that only what it lacks is fetched.
WHEELS ?= wheels
WHEEL_PYTHON ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEEL_HAVE ?=
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
WHEEL_FILES = $(wildcard $(WHEELS)/*.whl)
OFFLINE = $(if $(or $(PIP_FIND_LINKS),$(WHEEL_FILES)),--no-index $(if $(WHEEL_FILES),--find-links $(WHEELS)))
GPU_REPORT ?= gpu-report

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-cuda install-cpu test test-all lint smoke clean gpu-check wheels

install:
	@if [ "$(CUDA_TORCH)" = yes ] || $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; \
	then $(MAKE) --no-print-directory install-cuda; else $(MAKE) --no-print-directory install-cpu; fi

# The venv sees $(PYTHON)'s packages, torch first. Where $(PYTHON) is itself a venv, --system-site-packages would
# show the base interpreter's packages instead, so a .pth file adds that venv's site-packages. Only what the GPU
# check needs besides lorafit (pytest, peft): lint and the server's tests run on the CPU machines.
install-cuda:
	@echo "CUDA torch found: the venv reuses it$(if $(OFFLINE), (offline: $(OFFLINE)))"
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "_lorafit_parent_env.pth").write_text(sys.argv[1])' \
		"$$($(PYTHON) -c 'import site, sys; print(chr(10).join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')"
	$(BIN)/pip install --quiet $(OFFLINE) -e . pytest peft $(if $(WHEEL_FILES),|| { \
		echo "a requirement is not met by what is installed and $(WHEELS)/: installing those wheels and lorafit unchecked"; \
		$(BIN)/pip install --quiet $(OFFLINE) --no-deps $(WHEEL_FILES) && $(BIN)/pip install --quiet $(OFFLINE) --no-deps -e . \
		&& { $(BIN)/pip check || true; }; })
	@$(BIN)/python -c "import torch, transformers, lorafit; print(f'lorafit {lorafit.__version__}: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"

install-cpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_CPU)"
	$(BIN)/pip install --quiet -e ".[dev,serve]"
	@$(BIN)/python -c "import torch, transformers, lorafit; print(f'lorafit {lorafit.__version__}: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"

# On the GPU machine: GPU tests, the 8B benchmark against PEFT, the memory plan against measured peaks, auto
# checkpointing; ≤ 8 minutes on one H100. The report lands in $(GPU_REPORT)/ (gpu-report.md, gpu-report.json, logs/).
gpu-check:
	$(BIN)/python scripts/gpu_check.py $(GPU_REPORT)

# Where there is network: the wheels an offline GPU machine lacks (bitsandbytes, datasets and what they need), for
# its Python (WHEEL_PYTHON=3.12) and, with WHEEL_HAVE=its-pip-freeze.txt, only what it does not already have.
wheels:
	mkdir -p $(WHEELS)
	$(BIN)/python scripts/offline_wheels.py --python-version $(WHEEL_PYTHON) $(if $(WHEEL_HAVE),--have $(WHEEL_HAVE)) \
		> $(WHEELS)/requirements.txt
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version $(WHEEL_PYTHON) \
		$(addprefix --platform ,$(WHEEL_PLATFORMS)) --dest $(WHEELS) -r $(WHEELS)/requirements.txt
	@echo "$$(ls $(WHEELS)/*.whl | wc -l) wheels in $(WHEELS)/ ($$(du -sh $(WHEELS) | cut -f1)); on the GPU machine: make install WHEELS=$(WHEELS)"

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
