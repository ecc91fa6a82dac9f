# Everything runs from a fresh Debian 12 machine as root: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
GUEST  := build/guest
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all setup host venv guest debian-guest demo test lint unit bench fuzz clean

all: setup

setup: host venv guest

# apt packages and the libvirt-qemu user/group (idempotent, quick when all is there)
host:
	bash scripts/setup-host.sh

venv: $(VENV)/.installed

# The editable install in compat mode puts the source tree on sys.path by a plain .pth
# line; the default mode's import finder cost every Python (vmrun, each driver) ~12 ms.
$(VENV)/.installed: pyproject.toml setup.py vmrun/_fastsig.pyx vmrun/_fastsig.pxd vmrun/_fastsig_ns.pxi \
		vmrun/_fastsig_fork.pxi vmrun/nsinit.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel cython
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -m compileall -q vmrun   # every process starts without compiling
	touch $@

guest: $(GUEST)/vmlinuz $(GUEST)/initrd.gz $(GUEST)/base.qcow2 $(GUEST)/bios.img $(GUEST)/uefi.img debian-guest

# A real Debian 12 guest disk (systemd, cloud-init, sshd; SeaBIOS and OVMF).
# Cached in /var/cache/vmrun-test by the script's hash: fast after the first build.
debian-guest: $(GUEST)/debian.qcow2

$(GUEST)/debian.qcow2: tests/guest/build-debian.sh
	bash tests/guest/build-debian.sh $(GUEST)

$(GUEST)/vmlinuz $(GUEST)/initrd.gz &: tests/guest/build.sh tests/guest/init
	bash tests/guest/build.sh $(GUEST)

# Bootable disks of the test guest for the firmware boot tests (SeaBIOS, OVMF).
$(GUEST)/bios.img $(GUEST)/uefi.img &: tests/guest/build-disks.sh $(GUEST)/vmlinuz $(GUEST)/initrd.gz
	bash tests/guest/build-disks.sh $(GUEST)

# A small base image for examples/lab: its first line is a marker the guest can read.
$(GUEST)/base.qcow2:
	mkdir -p $(GUEST)
	printf 'vmrun-test lab base image\n' > $(GUEST)/base.raw
	truncate -s 16M $(GUEST)/base.raw
	qemu-img convert -f raw -O qcow2 $(GUEST)/base.raw $@
	rm -f $(GUEST)/base.raw

demo: setup
	$(BIN)/vmrun up examples/hello/stack.toml

lint: venv
	$(BIN)/ruff check vmrun tests bench
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -ra

# The manifest fuzz test, longer than in `make test` (VMRUN_FUZZ_SEED=N to vary it).
fuzz: venv
	VMRUN_FUZZ_COUNT=100000 $(BIN)/pytest -q -s tests/test_fuzz.py

# BENCH_ARGS, e.g. "--runs 1 --only single,cli"; compare two runs: bench/compare.py OLD NEW
# Bytecode first: with PYTHONDONTWRITEBYTECODE set, a module edited since `make venv` would
# be compiled again by every process the benchmark times.
bench: setup
	$(BIN)/python -m compileall -q vmrun
	$(BIN)/python bench/bench.py --json build/bench.json $(BENCH_ARGS)

clean:
	rm -rf build .venv vmrun/_fastsig.c vmrun/*.so examples/*/.vmrun
