#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# End-to-end runs in emulators. Expects the module, userspace and selftests built
# (the Makefile's demo/test targets do that first).
#
#   e2e.sh demo   Bochs (VT-x), 1 CPU: insmod rvmm.ko, rvmm-run info + status
#   e2e.sh linux  Bochs, 2 CPUs, its serial console on this terminal: the Linux guest's
#                 shell on rvmm (interactive)
#   e2e.sh bench  Bochs, 2 CPUs: benchmark guests and the Linux guest (1 and 2 vCPUs)
#                 on rvmm, KVM ept=0 and KVM ept=1 (benchquick: guests on rvmm only;
#                 benchlinux: the Linux guest only)
#   e2e.sh test   QEMU TCG (no VT-x): rvmm refuses to load;
#                 Bochs 1 CPU and 2 CPUs: the kselftests (KTAP)
# Logs go to build/e2e/. RVMM_E2E_CPUS="1 2" chooses the Bochs runs; RVMM_TEST_ONLY=a,b
# runs only those kselftests (a quick loop while developing; `make test` runs them all).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mode=${1:-test}
kdir=$(cat "$RVMM_ROOT/build/kdir")
out=$RVMM_ROOT/build/e2e
mkdir -p "$out"

# One initramfs per mode: a test run and a bench run may build theirs at the same time.
initrd=$out/initrd-$mode.gz
step "build initramfs"
bash "$RVMM_ROOT/scripts/initramfs.sh" "$kdir" "$initrd"
step_done

case $mode in
demo)
	step "boot Bochs (VT-x, 1 CPU): insmod rvmm.ko; rvmm-run info; rvmm-run status (about 1 min)"
	bash "$RVMM_ROOT/scripts/boot.sh" bochs --kdir "$kdir" --initrd "$initrd" --job demo \
		--log "$out/demo.log" --timeout 600
	step_done
	sed -E 's/\r$//' "$out/demo.log" | sed -n '/RVMM-INIT/,/RVMM-DEMO-RC/p'
	grep -q 'RVMM-DEMO-RC=0' "$out/demo.log" || die "the demo failed (serial log: $out/demo.log)"
	;;
linux)
	# The Linux guest's shell on rvmm, on this terminal (Bochs' serial port is the tty).
	step "boot Bochs (VT-x, 2 CPUs), insmod rvmm.ko, boot the Linux guest on rvmm (about 2 min to its shell; 'poweroff' in it ends the run)"
	bash "$RVMM_ROOT/scripts/boot.sh" bochs --kdir "$kdir" --initrd "$initrd" --job linux --cpus 2 \
		--log "$out/linux.log" --timeout 7200 --append "quiet" --interactive
	step_done
	;;
bench | benchquick | benchlinux)
	# 2 CPUs: the Linux guest runs with 1 and 2 vCPUs; the benchmark guests use one.
	step "boot Bochs (VT-x, 2 CPUs): benchmarks on rvmm$([ "$mode" != benchquick ] && echo ", KVM ept=0, KVM ept=1") (3-20 min)"
	bash "$RVMM_ROOT/scripts/boot.sh" bochs --kdir "$kdir" --initrd "$initrd" --job "$mode" \
		--cpus 2 --log "$out/bench.log" --timeout 3600
	step_done
	tr -d '\r' <"$out/bench.log" | sed -nE 's/^(\[ *[0-9.]+\] )?RVMM-BENCH-CSV //p' >"$out/bench.csv"
	tr -d '\r' <"$out/bench.log" | sed -nE 's/^(\[ *[0-9.]+\] )?RVMM-BENCH-RC ([^ ]+) ([0-9]+)$/\2 \3/p' |
		while read -r config rc; do
			[ "$rc" = 0 ] || log "WARNING: bench on $config failed (status $rc): see $out/bench.log"
		done
	[ -s "$out/bench.csv" ] || die "no benchmark results in $out/bench.log"
	"$RVMM_ROOT/target/x86_64-unknown-linux-gnu/release/rvmm-run" bench table "$out/bench.csv" | tee "$out/bench.txt"
	echo "CSV: $out/bench.csv; table: $out/bench.txt"
	;;
test)
	failed=0 passed=0
	record() { # name log
		local line
		if line=$(bash "$RVMM_ROOT/scripts/ktap-summary.sh" "$2" "$1"); then :; else failed=$((failed + 1)); fi
		printf '%s\n' "$line"
		local p f s
		p=$(printf '%s\n' "$line" | sed -nE 's/^== .*: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped of ([0-9]+).*/\1/p')
		s=$(printf '%s\n' "$line" | sed -nE 's/^== .*: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped of ([0-9]+).*/\3/p')
		f=$(printf '%s\n' "$line" | sed -nE 's/^== .*: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped of ([0-9]+).*/\4-\1-\3/p')
		passed=$((passed + ${p:-0}))
		skipped=$((${skipped:-0} + ${s:-0}))
		TOTAL_FAILED=$((${TOTAL_FAILED:-0} + ${f:-0}))
	}
	step "boot QEMU TCG (no VT-x): rvmm must refuse to load"
	bash "$RVMM_ROOT/scripts/boot.sh" qemu --kdir "$kdir" --initrd "$initrd" --job novmx \
		--log "$out/qemu-novmx.log" --timeout 120
	step_done
	record qemu-novmx "$out/qemu-novmx.log"
	for cpus in ${RVMM_E2E_CPUS:-1 2}; do
		step "boot Bochs (VT-x, $cpus CPU): kselftests (about 3 min with 1 CPU, 6 min with 2)"
		# clearcpuid=invpcid: global TLB flushes then rewrite CR4 from its shadow, the
		# path that would drop a CR4.VMXE set behind the kernel's back.
		bash "$RVMM_ROOT/scripts/boot.sh" bochs --kdir "$kdir" --initrd "$initrd" --job test \
			--cpus "$cpus" --log "$out/bochs-${cpus}cpu.log" --timeout 2700 --append "clearcpuid=invpcid${RVMM_TEST_ONLY:+ rvmm_only=$RVMM_TEST_ONLY}"
		step_done
		record "bochs-${cpus}cpu" "$out/bochs-${cpus}cpu.log"
		# The tests leave rvmm loaded: power-off must take every CPU out of VMX first.
		if grep -q 'rvmm: leaving VMX operation on all CPUs for shutdown' "$out/bochs-${cpus}cpu.log"; then
			echo "ok - bochs-${cpus}cpu: rvmm left VMX operation at power-off"
			passed=$((passed + 1))
		else
			echo "not ok - bochs-${cpus}cpu: no sign that rvmm left VMX operation at power-off"
			failed=$((failed + 1)) TOTAL_FAILED=$((${TOTAL_FAILED:-0} + 1))
		fi
	done
	echo "e2e: $passed passed, ${TOTAL_FAILED:-0} failed, ${skipped:-0} skipped"
	[ "$failed" = 0 ] || die "$failed e2e run(s) failed (logs in $out)"
	;;
*) die "e2e.sh: mode must be demo or test" ;;
esac
