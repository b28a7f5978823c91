# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then the tests).
.PHONY: setup cluster demo test test-unit lint format bench bench-tunnel bench-replicas bench-startup bench-api

setup:
	./scripts/setup.sh

# A real three-node Slurm cluster (on loopback addresses) and a loopback sshd for the integration tests (needs root).
cluster:
	./scripts/test_cluster.sh up

demo:
	./scripts/setup.sh demo
	.venv/bin/llmflow demo

test: setup cluster
	.venv/bin/pytest -q

test-unit: setup
	.venv/bin/pytest -q -m "not integration"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: setup
	.venv/bin/python benchmarks/client_throughput.py
	.venv/bin/python benchmarks/stream_overhead.py

# the SSH data path against the test cluster's sshd (needs root, like `make test`)
bench-tunnel: setup cluster
	.venv/bin/python benchmarks/tunnel_throughput.py

bench-replicas: setup
	.venv/bin/python benchmarks/replica_scaling.py

bench-startup: setup
	.venv/bin/python benchmarks/cli_startup.py

# the OpenAI-compatible API service: upload memory, retrieve latency idle and with 20 batches running
bench-api: setup
	.venv/bin/python benchmarks/api_service.py
