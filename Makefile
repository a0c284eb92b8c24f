# lclusterd — top-level Makefile.
#
#   make deb     build dist/lclusterd_<version>_all.deb
#   make lint    lintian on the built .deb (shows warnings, fails on errors)
#   make clean   remove build outputs
#   make test    run the test suite

PYTHON ?= /usr/bin/python3

VERSION := $(shell sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' lclusterd/__init__.py)
DIST    := dist
# The package is built in a copy of the work tree (tracked and untracked files,
# minus what .gitignore ignores), so that dpkg-buildpackage writes its
# outputs and droppings under dist/, never in the tree or in its parent.
BUILDDIR := $(DIST)/build/lclusterd-$(VERSION)
DEB      := $(DIST)/lclusterd_$(VERSION)_all.deb

.PHONY: all deb lint clean test

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

# ---- tests ------------------------------------------------------------------
# (test, demo and bench targets are kept by the developers of lclusterd/ and
# tests/; this placeholder runs the whole suite.)

test:
	$(PYTHON) -m pytest tests

# ---- demo -------------------------------------------------------------------

# ---- bench ------------------------------------------------------------------
