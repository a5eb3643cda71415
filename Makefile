# Set-up, the main job, the tests. Every target runs from the repository root.
PY ?= .venv/bin/python

.PHONY: setup demo test bench

setup:
	bash tools/setup.sh

demo:
	$(PY) tools/demo.py

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/pipeline_throughput.py
