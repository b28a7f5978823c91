# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then the tests).
.PHONY: setup demo test test-unit bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/llmflow demo

test: setup
	.venv/bin/pytest -q

test-unit: setup
	.venv/bin/pytest -q -m "not integration"

bench: setup
	.venv/bin/python benchmarks/client_throughput.py
