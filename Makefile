# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch pair that installs from this machine's disk (x86_64, Python 3.11).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv data check test demo bench bench-gpu protos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST for the demo and the tests: already there, else apt-get install (root or
# passwordless sudo), else torchvision's download, else Debian's .deb unpacked without root.
# DEBIAN_DATA=/elsewhere rehearses the fetch branches on a machine that has Debian's package.
DEBIAN_DATA ?=
data: venv
	$(PY) -m trainer.fetch_data $(if $(DEBIAN_DATA),--debian-dir '$(DEBIAN_DATA)')

# Lint and format check (ruff; `ruff format .` and `ruff check --fix .` mend most of it).
check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two files at a time, each file's tests in one process (they share module fixtures).
test: venv data
	$(PY) -m pytest -n 2 --dist loadfile

# Train the demo's recipe (Fashion-MNIST, 2 bank shards, 2 CPU workers); print kNN and linear-probe accuracy.
demo: venv data
	$(VENV)/bin/instdisc train --config fashion-mnist --output-dir runs/demo --name demo eval.linear=true

# Regenerate the committed gRPC code after editing protos/bank.proto.
protos: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/bank.proto

bench: venv
	mkdir -p runs
	$(VENV)/bin/instdisc bench bank --json runs/bench-bank.json
	$(VENV)/bin/instdisc bench train --json runs/bench-train.json
	if [ "$$(nproc)" -gt 1 ]; then $(VENV)/bin/instdisc bench train --bank-cores 1 --json runs/bench-train-bank-core.json; \
	else echo "one core: no bench train --bank-cores 1"; fi

# On a machine with an NVIDIA GPU: ResNet-18 at 32x32 in bf16 on real Fashion-MNIST images,
# (a) remote bank vs (b) in-process bank, then the kNN accuracy reached in a 5-epoch budget.
# First the bank alone: such machines have the cores to give each shard one of its own.
bench-gpu: venv
	mkdir -p runs
	$(VENV)/bin/instdisc bench bank --iters 500 --json runs/bench-gpu-bank.json
	$(VENV)/bin/instdisc bench train --device cuda --arch resnet18 --image-size 32 --batch 256 \
		--steps 200 --warmup 20 --json runs/bench-gpu-train.json
	$(VENV)/bin/instdisc train --config fashion-mnist --output-dir runs/bench-gpu --name bench-gpu \
		model.arch=resnet18 train.use_gpu=true train.workers=1 train.batch_size=256 train.lr=0.1 \
		train.epochs=5 train.cpus_per_worker=4

clean:
	rm -rf $(VENV) runs .pytest_cache
