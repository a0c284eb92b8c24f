# lclusterd — top-level Makefile.
#
#   make deb     build dist/lclusterd_<version>_all.deb
#   make lint    lintian on the built .deb (shows warnings, fails on errors)
#   make clean   remove build outputs
#   make test    run the test suite
#   make bench   measure throughput, latency, memory against systemd and Slurm

PYTHON ?= /usr/bin/python3

VERSION := $(shell sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' lclusterd/__init__.py)
DIST    := dist
# The package is built in a copy of the work tree (tracked and untracked files,
# minus what .gitignore ignores), so that dpkg-buildpackage writes its
# outputs and droppings under dist/, never in the tree or in its parent.
BUILDDIR := $(DIST)/build/lclusterd-$(VERSION)
DEB      := $(DIST)/lclusterd_$(VERSION)_all.deb

.PHONY: all deps deb lint clean test demo bench

all: deb

# ---- packaging -------------------------------------------------------------

deb:
	@test -n "$(VERSION)" || { echo "no __version__ in lclusterd/__init__.py" >&2; exit 1; }
	@grep -q '^lclusterd ($(VERSION))' debian/changelog || \
	  { echo "debian/changelog does not start at version $(VERSION)" >&2; exit 1; }
	rm -rf $(DIST)/build $(DIST)/lclusterd_$(VERSION)_*
	mkdir -p $(BUILDDIR)
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(BUILDDIR)
	cd $(BUILDDIR) && dpkg-buildpackage -us -uc -b
	mv $(DIST)/build/lclusterd_$(VERSION)_* $(DIST)/
	rm -rf $(DIST)/build
	@echo "built $(DEB)"

lint: $(DEB)
	lintian --fail-on error $(DEB)

$(DEB):
	$(MAKE) deb

clean:
	rm -rf $(DIST) build .pybuild *.egg-info

# ---- dependencies ------------------------------------------------------------
# Everything the build, the tests and the demo need, from Debian's archive.
# `make deps` installs what is missing (as root), so a fresh Debian 12 machine
# needs nothing else.

BUILD_DEPS := debhelper dh-python python3-all python3-setuptools fakeroot lintian git
RUN_DEPS   := python3-etcd3 python3-dbus-next python3-systemd python3-pyroute2 \
              python3-click python3-aiohttp python3-prometheus-client iproute2 openssl
# chromium, chromium-driver and python3-selenium: the status page's browser test;
# prometheus: the scrape test.
TEST_DEPS  := python3-pytest etcd-server etcd-client systemd-container debootstrap \
              procps util-linux chromium chromium-driver python3-selenium prometheus

deps:
	@missing=$$(for p in $(BUILD_DEPS) $(RUN_DEPS) $(TEST_DEPS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q ' installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# ---- tests ------------------------------------------------------------------
# Unit (pure core), integration (a real etcd), system (the .deb installed
# with apt into Debian 12 and 13 containers booted with systemd as PID 1).

PYTEST_ARGS ?=

test: deps
	$(PYTHON) -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS) tests

# ---- demo -------------------------------------------------------------------
# Build, install and run one job. Where systemd is PID 1 this installs the
# package on this machine; elsewhere it boots a throwaway container for it.

demo: deps deb
	@if [ "$$(ps -p 1 -o comm=)" = systemd ]; then \
	  set -ex; apt-get install -y ./$(DEB); \
	  uuid=$$(lclusterc addjob --wait 'echo hello from $$(hostname)'); \
	  lclusterc checkjob $$uuid; journalctl -u lcluster-job@$$uuid --no-pager; \
	else \
	  $(PYTHON) -m tests.system.container demo --deb-dir $(DIST); \
	fi

# ---- bench ------------------------------------------------------------------
# `make bench` (issue 13's targets, each printed met / missed; ~20 minutes on
# 2 cores): first the scale section (tests/bench/sim.py, no containers: 10
# and 100 simulated nodes running the real node code against a 3-member etcd
# on loopback, 1,000 jobs a run). Then tests/bench/run.py: the history run
# (sim.py --history: 100,000 jobs through one simulated node with the
# package's retention settings, 5-8 minutes: at least one of the node's own
# prune passes, one every 300 s); the test container (its rootfs also holds Slurm and
# munge, cached in /var/cache/lclusterd-tests) with the .deb installed by apt,
# where lclusterd, raw systemd and Slurm run the same jobs twice: quiet, then
# loaded (one busy process a CPU on the host, outside the container); and the
# cluster tests' three nodes (tests/cluster/harness.py) for the 3-node
# section. Prints the tables; saves dist/bench/scale.json, history.json,
# results.json, latency.png and throughput.png.
# BENCH_ARGS="--scale 0.1" for a quick try of run.py's parts (10,000 jobs in
# the history run: nothing to prune, its bound "not measured");
# SCALE_ARGS=--full for the issue's 10/100/1,000 nodes x 20,000 jobs.

BENCH_DEPS := python3-matplotlib
BENCH_ARGS ?=
SCALE_ARGS ?= --jobs 1000

bench: deps deb
	@missing=$$(for p in $(BENCH_DEPS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q ' installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	mkdir -p $(DIST)/bench
	$(PYTHON) -m tests.bench.sim --out $(DIST)/bench/scale.json $(SCALE_ARGS)
	$(PYTHON) -m tests.bench.run --deb-dir $(DIST) --out $(DIST)/bench $(BENCH_ARGS)
