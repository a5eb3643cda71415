# Set-up, the main job, the tests. Every target runs from the repository root.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
APT_DEPS = pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: setup demo test bench

setup:
	bash tools/setup.sh

demo:
	$(PY) tools/demo.py

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/pipeline_throughput.py
