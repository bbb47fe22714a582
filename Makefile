# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch pair that installs from this machine's disk (x86_64, Python 3.11).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo bench protos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

# Train the default config (Fashion-MNIST, 2 bank shards, 2 CPU workers) and print kNN accuracy.
demo: venv
	$(VENV)/bin/instdisc train --config fashion-mnist --output-dir runs/demo --name demo

# Regenerate the committed gRPC code after editing protos/bank.proto.
protos: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/bank.proto

bench: venv
	$(VENV)/bin/instdisc bench bank --json runs/bench-bank.json

clean:
	rm -rf $(VENV) runs .pytest_cache
