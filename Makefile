# bcvk — the two commands a user needs are `make demo` and `make test`.
# Every target is idempotent: a second run skips what is done.

SHELL := /bin/bash
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
BCVK := $(VENV)/bin/bcvk
DEMO_IMAGE := localhost/bcvk/debian-bootc:12
VIRTIOFSD_PREFIX ?= /opt/bcvk/virtiofsd
MANPREFIX ?= $(if $(filter 0,$(shell id -u)),/usr/local/share/man,$(HOME)/.local/share/man)
TIMED := scripts/timed

.PHONY: all demo test setup host venv venv-dev virtiofsd images man install-man lint unit integration clean

all: setup

## demo: set up this host, build the demo image, boot it and run a command in it
demo: setup images
	@$(TIMED) inspect $(BCVK) images inspect $(DEMO_IMAGE)
	@$(TIMED) demo $(BCVK) ephemeral run-ssh --ssh-timeout 600 $(DEMO_IMAGE) -- \
	  'systemctl is-system-running --wait; findmnt -no FSTYPE /; cat /etc/os-release'


## test: set up this host with test dependencies and images, then run every test
test: setup venv-dev images
	@rm -f build/stage-times.tsv.tests
	@$(TIMED) tests scripts/run-tests.sh

setup: host venv virtiofsd install-man

host:
	@$(TIMED) host-packages scripts/setup-host.sh

$(VENV)/.stamp: pyproject.toml
	@$(TIMED) venv bash -c '$(PYTHON) -m venv $(VENV) && \
	  $(VENV)/bin/pip install -q --disable-pip-version-check -e . && touch $@'

venv: $(VENV)/.stamp

$(VENV)/.stamp-dev: $(VENV)/.stamp pyproject.toml
	@$(TIMED) venv-dev bash -c '$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev]" && touch $@'

venv-dev: $(VENV)/.stamp-dev

virtiofsd:
	@$(TIMED) virtiofsd scripts/fetch-virtiofsd.sh $(VIRTIOFSD_PREFIX)

images: venv
	@$(TIMED) images scripts/build-images.sh
	@$(TIMED) rootless-user scripts/setup-rootless-user.sh
	@$(TIMED) rootless-venv scripts/setup-rootless-venv.sh

build/man/.stamp: $(VENV)/.stamp $(wildcard bcvk/cli/*.py)
	@$(TIMED) man $(VENV)/bin/python -m bcvk.cli.manpage build/man
	@touch $@

man: build/man/.stamp

install-man: man
	@mkdir -p $(MANPREFIX)/man1
	@cp build/man/*.1 $(MANPREFIX)/man1/

## unit: the hermetic tier (fakes only, no VM, seconds): what a plain `pytest` runs
unit: venv-dev
	@$(TIMED) unit $(VENV)/bin/python -m pytest -q -p no:cacheprovider

## lint: ruff, ruff format, mypy --strict and the layer contracts
lint: venv-dev
	@$(TIMED) lint $(VENV)/bin/python -m pytest -q -p no:cacheprovider -m lint

## integration: the real tier (podman, QEMU, libvirtd, ssh) and the install test
integration: setup venv-dev images
	@$(TIMED) integration scripts/run-tests.sh -m "integration or install"

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .coverage*
