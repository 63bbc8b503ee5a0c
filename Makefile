# bdn — the two commands a newcomer needs are `make demo` and `make test`.
# Both build the virtual environment first, from nothing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv lock demo test test-fast typecheck lint bench bench-remote bench-gpu bench-fleet clean kube-bin

venv: $(STAMP)

# constraints.txt pins every package of a known-good install: left free, pip's resolver
# can spend half an hour backtracking through boto releases and then give up
# (resolution-too-deep). `make lock` rewrites it from the current venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^bdn==' > constraints.txt

demo: venv
	$(PY) -m demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

# The inner loop: everything but the tests marked slow (real service processes, clusters,
# large files), on every core (pytest-xdist); under 30 s on a 2-core machine.
test-fast: venv
	$(PY) -m pytest -m "not slow" -n auto

# manifests/ and the pure policies, strictly ([tool.mypy] in pyproject.toml).
typecheck: venv
	$(PY) -m mypy

lint: venv
	$(VENV)/bin/ruff check .

# Benchmarks print medians and ratios against a baseline run in the same process.
# bench/cache.py and bench/pull.py compare against nginx and aria2c when installed
# (apt-get install nginx aria2); bench/load.py needs the `bench` extra.
BENCHES := bench/mirror.py bench/cache.py bench/pull.py bench/load.py bench/coldstart.py

bench: venv
	$(PY) -m pip install --quiet -e '.[all,test,bench]'
	for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || exit 1; done

bench-remote: venv
	$(PY) bench/mirror_remote.py --source all

bench-gpu: venv
	$(PY) bench/gpu_load.py

# A simulated fleet in network namespaces (root and iproute2 needed: ip, tc).
bench-fleet: venv
	$(PY) bench/fleet.py

# The Kubernetes control plane the tests in tests/kube/ run (v1.20.2 kube-apiserver,
# kube-controller-manager, kube-scheduler): unpacked from shared/kube where a copy sits
# beside the repo, else built from Debian's source package (~15 min). etcd comes from
# Debian: apt-get install etcd-server.
KUBE_BIN    ?= $(HOME)/.cache/bdn-kube/bin
KUBE_SHARED := $(firstword $(wildcard ../shared/kube/unpack.sh ../../shared/kube/unpack.sh))

kube-bin:
	if [ -n "$(KUBE_SHARED)" ]; then $(KUBE_SHARED) $(KUBE_BIN); \
	else tests/support/kube_build.sh $(KUBE_BIN); fi

clean:
	rm -rf $(VENV) .demo .bench
