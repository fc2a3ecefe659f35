# Trinity — every target uses .venv and installs it first when it is missing.
VENV      ?= .venv
PYTHON    ?= python3
STAMP     := $(VENV)/.installed
FIRESTORE_PORT ?= 8080
FIRESTORE_DEPS := firestore/node_modules/.package-lock.json
MODEL     := $(VENV)/.witness-model
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The demo: the 24-hour plan compressed (2880 simulated seconds per real second).
DEMO_TIME_SCALE ?= 2880
# Where runs write their snapshots and logs (TRINITY_LOG_DIR, as the programs read it).
LOG_DIR ?= $(or $(TRINITY_LOG_DIR),logs/24h_test)

.DEFAULT_GOAL := help
.PHONY: help install demo smoke test lint schema start-24h stop status costs report export dashboards kill-and-resume validate-persistence burst bench-bus eval-witness bench-witness bench-witness-stream bench-llm bench-24h bench bench-pipeline chaos firestore-emulator clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

# WITNESS's embedding table and trained model, into the cache; again whenever the dev set
# or the detector's code changes (the modules knowledge.MODEL_MODULES hashes, and the
# embedding; a WITNESS that finds no model trains it in a child process).
$(MODEL): $(STAMP) $(addprefix agents/witness/,text.py features.py exemplars.py model.py \
    train.py dataset.py embedding.py) $(wildcard agents/data/devset_*.jsonl)
	$(VENV)/bin/python -m trinity.agents.witness.knowledge
	touch $(MODEL)

install: $(STAMP) $(MODEL) $(FIRESTORE_DEPS) ## Create .venv with everything Trinity needs (idempotent)

demo: install ## The main job on embedded defaults: the 24-hour plan compressed, hour-12 restart included, then the report
	trinity run --duration 24 --time-scale $(DEMO_TIME_SCALE) --restart-at 12; \
	  code=$$?; trinity report --input $(LOG_DIR) || code=1; exit $$code

smoke: install ## The plan's 2-hour smoke test, compressed, in the foreground
	trinity run --duration 2 --time-scale $(DEMO_TIME_SCALE)

# The test suite in two parts: the in-process tests on both cores (pytest-xdist), then
# the multi-process runs (tests/system, marked slow) one at a time, alone on the
# machine, since a run sharing its cores misses heartbeats as it should.
test: install ## Run the test suite
	pytest -m "not slow" -n 2
	pytest -m slow

start-24h: install ## Run the pre-test checklist (trinity doctor; stops on a FAIL), then start the 24-hour run under supervisord in the background
	trinity doctor
	trinity run --detach

stop: install ## Stop the programs and supervisord (and orphans of a killed supervisord)
	trinity stop

status: install ## Show run progress, queues and agents
	trinity status

costs: install ## Model-call totals of the latest run from the cost ledger
	trinity costs

report: install ## The latest run's report: Markdown, HTML and four charts in reports/
	trinity report --input $(LOG_DIR)

export: install ## The latest run's events, outcomes, model calls, alerts and metrics as CSV in reports/csv/
	trinity export --format csv --input $(LOG_DIR) --output reports/csv

dashboards: install ## The cost, patterns and system dashboards, printed once (trinity dashboard NAME --live to follow)
	trinity dashboard cost; trinity dashboard patterns; trinity dashboard system

kill-and-resume: install ## kill -9 everything, wait 5 s, resume the run, validate persistence
	trinity kill-and-resume

validate-persistence: install ## Check patterns, costs, cycle position and queues were restored
	trinity validate-persistence

burst: install ## 100 events at once through the three agents: one outcome each, bounded messages
	TRINITY_BURST_EVENTS=$${TRINITY_BURST_EVENTS:-100} pytest -q tests/system/test_pipeline.py -k burst

bench-bus: install ## Benchmark: journaled bus vs raw pyzmq PUB/SUB (exit 1 if target missed)
	python benchmarks/bench_bus.py

eval-witness: install ## WITNESS cross-validated accuracy, P/R, macro-F1, FP on none, ECE (exit 1 if missed)
	trinity witness eval

bench-witness: install ## Benchmark: WITNESS latency and RSS at 1k/10k/100k exemplars (exit 1 if missed)
	python benchmarks/bench_witness.py

bench-witness-stream: install ## Benchmark: WITNESS learning from 1,000,000 varied events: RSS <= 400 MB, p99 <= 5 ms at the end (exit 1 if missed)
	python benchmarks/bench_witness_stream.py

bench-llm: install ## Benchmark: ARCHITECT/EXECUTOR call vs direct llama-cpp-python call (exit 1 if >5% overhead)
	python benchmarks/bench_llm.py

bench-24h: install ## Benchmark: compressed 24-hour run: wall time, peak total memory, growth per hour
	python benchmarks/bench_24h.py

bench: install ## Benchmark suite: bus, pipeline, witness, llm, 24h in one table, reports/bench_YYYYMMDD.md (exit 1 if a target is missed; BENCH_SHORT=1: short forms)
	python benchmarks/bench_all.py

bench-pipeline: install ## Benchmark: end to end with the instant provider: >= 2,000 events/s, p99 <= 50 ms at 200 events/s, WITNESS <= 0.5 ms CPU/event at 10k exemplars (exit 1 if missed; BENCH_GATE=latency,witness: only those)
	python benchmarks/bench_pipeline.py

# CHAOS_ARGS="--duration 6 --kills 10 --stops 2" is the short form CI runs.
chaos: install ## A compressed 24-hour run under a chaos monkey (50 kill -9, SIGSTOPs), then an audit (exit 1 if anything lost or doubled)
	trinity chaos $(CHAOS_ARGS)

# The Firestore emulator (npm @firestore-emulator/server, pinned in firestore/package-lock.json).
$(FIRESTORE_DEPS): firestore/package.json firestore/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix firestore --ignore-scripts --no-audit --no-fund; \
	else echo "npm not found: no Firestore emulator (its tests skip; with CI=true they fail)"; fi

firestore-emulator: $(FIRESTORE_DEPS) ## Run the Firestore emulator in the foreground (FIRESTORE_PORT=8080; 0 = any free port)
	node firestore/serve.mjs $(FIRESTORE_PORT)

clean: stop ## Remove databases, logs and reports of earlier runs (keeps .venv)
	rm -rf trinity_*.db trinity_*.db-* trinity_*.faiss logs/24h_test logs/archive logs/supervisor reports .run chaos

lint: install ## ruff, the layers' import contracts, the stores' generated schema, mypy --strict
	ruff check trinity bus agents controller tests benchmarks
	rm -rf build/typecheck && pip install --quiet --no-deps --target build/typecheck .
	cd build && PYTHONPATH=typecheck lint-imports ../pyproject.toml
	python -m trinity.stores.schema --check
	cd build && MYPYPATH=typecheck mypy --config-file ../setup.cfg -p trinity

schema: install ## Regenerate the stores' DDL blocks from their SQLAlchemy declarations
	python -m trinity.stores.schema
