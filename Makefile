# forkbridge: `make test` and `make demo` work on a fresh clone; they set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= conf/forkbridge.yaml

.PHONY: test lint run sysdeps freeswitch demo bench bench-switch bench-load scale-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Debian tools some tests use (promtool, prometheus, systemd-analyze, kamailio); a no-op when present or not root.
sysdeps:
	@sh scripts/system-packages.sh

# The real FreeSWITCH the real-switch tests run against: FORKBRIDGE_FREESWITCH=/prefix, or the bundle in
# ../shared/freeswitch installed into .cache/freeswitch.
freeswitch:
	@sh scripts/freeswitch.sh

test: $(STAMP) sysdeps freeswitch
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The daemon in the foreground with a config of yours: make run CONFIG=/etc/forkbridge/forkbridge.yaml
run: $(STAMP)
	$(VENV)/bin/forkbridge run --config $(CONFIG)

# A whole simulated call through the real daemon (fsim + echo engine), with its timeline and latencies.
demo: $(STAMP)
	$(PY) tools/demo.py

# Load figures (CPU and memory per call, latencies): make bench [STEPS=50,100] [SECONDS=10] [N=10]
# then, when a FreeSWITCH is found as for the tests, what callers hear on it (skipped with one line otherwise),
# then forkbridge against bench/naive.py on it [LOAD_CALLS=20,40] [LOAD_SECONDS=20] [LOAD_WORKERS=2]
# (installs the bench extra)
STEPS ?= 50,100,200,300,500
SECONDS ?= 20
N ?= 10
LOAD_CALLS ?= 20,40,80
LOAD_SECONDS ?= 30
LOAD_WORKERS ?= 1
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(PY) bench/run.py --steps $(STEPS) --seconds $(SECONDS)
	$(PY) bench/realswitch.py --calls $(N)
	$(PY) bench/switchload.py --calls $(LOAD_CALLS) --seconds $(LOAD_SECONDS)

# forkbridge against a naive bridge on a real switch, alone: CPU and memory per call, interleaved A B A B
bench-load: $(BENCH_STAMP)
	$(PY) bench/switchload.py --calls $(LOAD_CALLS) --seconds $(LOAD_SECONDS) --workers $(LOAD_WORKERS)

# The real-switch part alone: N concurrent calls per playback mode, sample rate and engine pace
bench-switch: $(STAMP)
	$(PY) bench/realswitch.py --calls $(N)

# Scale-out on this machine's loopback: Kamailio's dispatcher (deploy/scale/) on 127.0.0.1:5060 in front of two
# FreeSWITCH + forkbridge nodes (127.0.0.2, 127.0.0.3), SIPp callers; spread, drain, node loss, daemon loss.
# Needs root (SIPp's RTP). Other addresses: make scale-demo SCALE_ARGS="--proxy 127.0.0.1:15060 --nodes ..."
SCALE_ARGS ?=
scale-demo: $(STAMP) sysdeps freeswitch
	$(PY) tools/scale_demo.py $(SCALE_ARGS)
