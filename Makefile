# SPDX-License-Identifier: GPL-2.0
#
# rvmm top-level Makefile. `make help` lists the targets.
#   KDIR=<built kernel tree>  build the module against it (default: the cached kernel
#                             that scripts/kernel.sh builds; KSRC=<source> builds one)

SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
KMAKE_VARS := LLVM=-19 RUSTC=/usr/bin/rustc BINDGEN=$(HOME)/.cargo/bin/bindgen LIBCLANG_PATH=/usr/lib/llvm-19/lib
TARGET := x86_64-unknown-linux-gnu
STATIC_RUSTFLAGS := -C target-feature=+crt-static

export KDIR KSRC RVMM_CACHE

ifneq ($(KERNELRELEASE),)
# Invoked by Kbuild: the module's rules are in ./Kbuild.
else

.PHONY: fuzz all help setup kernel kernel-debug guest-kernel module module-debug userspace selftests initramfs demo linux test test-long bench check-host e2e clean

all: module userspace selftests

help:
	@echo "make setup      install host packages and bindgen-cli (root)"
	@echo "make kernel     fetch, patch and build the host kernel into ~/.cache/rvmm"
	@echo "make guest-kernel  build the Linux guest kernel (kernel/guest.config) into ~/.cache/rvmm"
	@echo "make module     build rvmm.ko (KDIR=... to use your own built tree)"
	@echo "make kernel-debug  build the debug host kernel (+ kernel/debug.config: KASAN, lockdep, UBSAN)"
	@echo "make module-debug  build build/debug-module/rvmm.ko against it (DEBUG_KDIR=... for yours)"
	@echo "make userspace  build rvmm-run (static)"
	@echo "make selftests  build the kselftest binary (static)"
	@echo "make demo       boot Bochs, insmod rvmm.ko, run 'rvmm-run info'"
	@echo "make linux      boot Bochs, insmod rvmm.ko, a Linux guest's shell on this terminal"
	@echo "make test       host tests + e2e kselftests in Bochs and QEMU"
	@echo "make test-long  the shadow MMU's property tests with 100000 cases each (PROPTEST_CASES=...), the emulator against the host CPU with 3000 per form (RVMM_NATIVE_CASES=...)"
	@echo "make bench      benchmark guests on rvmm, KVM ept=0, KVM ept=1 in one Bochs boot"
	@echo "make fuzz       the fuzzer on the debug kernel for FUZZ_SECONDS (600; FUZZ_SEED=0x... repeats a run)"

setup:
	bash scripts/setup-host.sh

kernel: setup
	bash scripts/kernel.sh >/dev/null

kernel-debug: setup
	bash scripts/kernel.sh debug >/dev/null

guest-kernel: setup
	bash scripts/guest-kernel.sh

build/kdir: FORCE
	@mkdir -p build
	@kdir=$$(bash scripts/kernel.sh) && echo "$$kdir" > $@.tmp && { cmp -s $@.tmp $@ || mv $@.tmp $@; }; rm -f $@.tmp

build/debug-kdir: FORCE
	@mkdir -p build
	@kdir=$$(bash scripts/kernel.sh debug) && echo "$$kdir" > $@.tmp && { cmp -s $@.tmp $@ || mv $@.tmp $@; }; rm -f $@.tmp

build/crates.mk: Cargo.lock Cargo.toml rvmm/core/Cargo.toml uapi/Cargo.toml scripts/gen-crates-mk.py
	@mkdir -p build
	cargo fetch --locked -q
	python3 scripts/gen-crates-mk.py Cargo.toml $@ rvmm-uapi rvmm-core

module: build/kdir build/crates.mk
	$(MAKE) -C $$(cat build/kdir) M=$(ROOT) $(KMAKE_VARS) modules
	@ls -l rvmm.ko

# The same module against the debug kernel, from a mirror of its sources in
# build/debug-module (the repo root holds the default kernel's objects).
module-debug: build/debug-kdir build/crates.mk
	@. scripts/lib.sh && mirror_module_sources $(ROOT)/build/debug-module
	$(MAKE) -C $$(cat build/debug-kdir) M=$(ROOT)/build/debug-module $(KMAKE_VARS) modules
	@ls -l build/debug-module/rvmm.ko

userspace:
	RUSTFLAGS="$(STATIC_RUSTFLAGS)" cargo build --locked --release --target $(TARGET) -p rvmm-run

selftests:
	$(MAKE) -C selftests

demo: setup module userspace selftests
	bash scripts/e2e.sh demo

linux: setup module userspace selftests
	bash scripts/e2e.sh linux

test:
	bash scripts/test.sh

# The property tests of rvmm-core (shadow pool against the SDM reference walkers, the
# walker, the emulator) with many more cases than `make test` runs, and the long replays
# (the whole of kvm-unit-tests' access.c main loop): before a change to the MMU lands.
test-long:
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} RVMM_NATIVE_CASES=$${RVMM_NATIVE_CASES:-3000} \
		cargo test --locked --release -p rvmm-core --lib -- --include-ignored

fuzz: setup module userspace selftests module-debug
	bash scripts/e2e.sh fuzz

bench: setup module userspace selftests
	$(MAKE) -C selftests/bench
	bash scripts/e2e.sh bench

clean:
	-[ -f build/kdir ] && $(MAKE) -C $$(cat build/kdir) M=$(ROOT) clean
	rm -rf build

FORCE:
endif
