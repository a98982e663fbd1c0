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
#                 Bochs 1 CPU and 2 CPUs: the kselftests (KTAP);
#                 then Bochs on the debug kernel (kernel/debug.config: KASAN, lockdep,
#                 UBSAN, ...): the adversarial kselftests and the fuzzer
#   e2e.sh debug  only the debug-kernel run (`make module-debug` builds what it needs)
#   e2e.sh fuzz   the fuzzer alone on the debug kernel for FUZZ_SECONDS (default 600)
#                 seconds, FUZZ_SEED=0x... to repeat a run (`make fuzz`)
# Logs go to build/e2e/. RVMM_E2E_CPUS="1 2" chooses the Bochs runs; RVMM_TEST_ONLY=a,b
# runs only those kselftests (a quick loop while developing; `make test` runs them all).
# RVMM_E2E_DEBUG_CPUS="1" chooses the debug-kernel runs ("" for none); RVMM_DEBUG_TESTS=a,b
# replaces their test list. Every Bochs run fails on a kernel report in its serial log
# (BUG, WARNING, KASAN, UBSAN, lockdep, hung task, lockup, panic): one "not ok" line each.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mode=${1:-test}
kdir=""
[ "$mode" = debug ] || kdir=$(cat "$RVMM_ROOT/build/kdir")
out=$RVMM_ROOT/build/e2e
mkdir -p "$out"

# One initramfs per mode: a test run and a bench run may build theirs at the same time.
initrd=$out/initrd-$mode.gz
if [ "$mode" != debug ]; then
	step "build initramfs"
	bash "$RVMM_ROOT/scripts/initramfs.sh" "$kdir" "$initrd"
	step_done
fi

# The debug kernel's run: what it does not need (KVM comparisons, hotplug, the Linux
# guest) stays in the default runs.
DEBUG_TESTS=device_opens,io_and_hlt_exits,mmio_round_trip,smp_shared_page_tables,two_vms_two_vcpus
DEBUG_TESTS+=,kill_mid_run_frees_everything,hlt_at_top_of_address_space,lsl_far_selector_after_guest
DEBUG_TESTS+=,guest_syscall_before_lstar,memslot_delete_then_munmap,readonly_slot_not_written
DEBUG_TESTS+=,two_vcpus_pool_reset_while_halted,stats_while_vcpu_runs,apic_timer_storm_bounded_section
DEBUG_TESTS+=,memlock_limit_enomem,memcg_limit_enomem,fan_in_page_tables_bounded_section,fuzz_ioctls_and_guests,no_kmemleak_reports
# What the kernel prints when something is wrong (the fuzzer watches for the same).
REPORT_MARKERS=("BUG:" "WARNING:" "Oops" "UBSAN" "KASAN" "possible circular locking"
	"possible recursive locking" "inconsistent lock state"
	"sleeping function called from invalid context" "INFO: task" "soft lockup"
	"hard LOCKUP" "Kernel panic")

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
# scan_reports name log: one "not ok" line per kernel report line in the whole serial log
# (deduplicated, at most 20 shown), or one "ok" line; status 1 on reports.
scan_reports() {
	local name=$1 log=$2 args=() m hits n
	for m in "${REPORT_MARKERS[@]}"; do args+=(-e "$m"); done
	hits=$(sed -E 's/\r$//; s/^\[ *[0-9]+\.[0-9]+\] //' "$log" | grep -F "${args[@]}" | awk '!seen[$0]++' || true)
	if [ -z "$hits" ]; then
		echo "ok - $name: no kernel reports in the serial log"
		passed=$((passed + 1))
		return 0
	fi
	n=$(printf '%s\n' "$hits" | wc -l)
	printf '%s\n' "$hits" | head -n 20 | sed "s/^/not ok - $name: kernel report: /"
	[ "$n" -le 20 ] || echo "# $name: $((n - 20)) more report lines in $log"
	TOTAL_FAILED=$((${TOTAL_FAILED:-0} + n))
	return 1
}
# check_run name log: the run's KTAP verdict and its kernel reports (one failed run at most).
check_run() {
	local before=$failed
	record "$1" "$2"
	scan_reports "$1" "$2" || [ "$failed" -gt "$before" ] || failed=$((failed + 1))
}
# check_vmx_off name log: the tests leave rvmm loaded, and power-off must take every CPU
# out of VMX first.
check_vmx_off() {
	if grep -q 'rvmm: leaving VMX operation on all CPUs for shutdown' "$2"; then
		echo "ok - $1: rvmm left VMX operation at power-off"
		passed=$((passed + 1))
	else
		echo "not ok - $1: no sign that rvmm left VMX operation at power-off"
		failed=$((failed + 1)) TOTAL_FAILED=$((${TOTAL_FAILED:-0} + 1))
	fi
}
# run_debug: the debug kernel (KASAN, lockdep, UBSAN, ...) with its own rvmm.ko and KVM
# modules, running DEBUG_TESTS.
run_debug() {
	local dkdir ko dinitrd cpus tests=${RVMM_DEBUG_TESTS:-$DEBUG_TESTS}
	[ -n "${RVMM_E2E_DEBUG_CPUS-1}" ] || return 0
	[ -f "$RVMM_ROOT/build/debug-kdir" ] && [ -f "$RVMM_ROOT/build/debug-module/rvmm.ko" ] ||
		die "the debug kernel's rvmm.ko is not built" "run 'make module userspace selftests module-debug' (the debug kernel takes about 15 min)"
	dkdir=$(cat "$RVMM_ROOT/build/debug-kdir")
	ko=$RVMM_ROOT/build/debug-module/rvmm.ko
	dinitrd=$out/initrd-debug.gz
	step "build initramfs (debug kernel)"
	# initramfs.sh takes KVM's modules from the debug kernel and rvmm.ko from the repo
	# root (the default kernel's); a second cpio archive appended to it replaces that
	# rvmm.ko with the debug one (the kernel unpacks concatenated archives in order).
	# The debug kernel's own release (-rvmm-debug) refuses the other one if this fails.
	bash "$RVMM_ROOT/scripts/initramfs.sh" "$dkdir" "$dinitrd"
	local ov
	ov=$(mktemp -d)
	mkdir -p "$ov/lib/modules/rvmm"
	cp "$ko" "$ov/lib/modules/rvmm/rvmm.ko"
	(cd "$ov" && echo lib/modules/rvmm/rvmm.ko | cpio -o -H newc --quiet | gzip -1) >>"$dinitrd"
	rm -rf "$ov"
	step_done
	for cpus in ${RVMM_E2E_DEBUG_CPUS-1}; do
		step "boot Bochs (VT-x, $cpus CPU) on the debug kernel (KASAN, lockdep, UBSAN): adversarial kselftests + fuzzer (about 10 min)"
		bash "$RVMM_ROOT/scripts/boot.sh" bochs --kdir "$dkdir" --initrd "$dinitrd" --job test \
			--cpus "$cpus" --log "$out/bochs-debug-${cpus}cpu.log" --timeout "${DEBUG_TIMEOUT:-3600}" --append "clearcpuid=invpcid rvmm_only=$tests${DEBUG_APPEND:+ $DEBUG_APPEND}"
		step_done
		check_run "bochs-debug-${cpus}cpu" "$out/bochs-debug-${cpus}cpu.log"
		check_vmx_off "bochs-debug-${cpus}cpu" "$out/bochs-debug-${cpus}cpu.log"
	done
}

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
		check_run "bochs-${cpus}cpu" "$out/bochs-${cpus}cpu.log"
		check_vmx_off "bochs-${cpus}cpu" "$out/bochs-${cpus}cpu.log"
	done
	run_debug
	echo "e2e: $passed passed, ${TOTAL_FAILED:-0} failed, ${skipped:-0} skipped"
	[ "$failed" = 0 ] || die "$failed e2e run(s) failed (logs in $out)"
	;;
debug)
	run_debug
	echo "e2e: $passed passed, ${TOTAL_FAILED:-0} failed, ${skipped:-0} skipped"
	[ "$failed" = 0 ] || die "$failed e2e run(s) failed (logs in $out)"
	;;
fuzz)
	# The fuzzer alone, as long as asked, on the debug kernel (its reports fail the run).
	secs=${FUZZ_SECONDS:-600}
	RVMM_DEBUG_TESTS=fuzz_ioctls_and_guests,no_kmemleak_reports
	DEBUG_APPEND="rvmm_fuzz_seconds=$secs${FUZZ_SEED:+ rvmm_fuzz_seed=$FUZZ_SEED}"
	# Bochs runs the guest kernel about 10 times slower than real time.
	DEBUG_TIMEOUT=$((secs * 12 + 900))
	run_debug
	grep -h '# fuzz' "$out"/bochs-debug-*cpu.log || true
	echo "e2e: $passed passed, ${TOTAL_FAILED:-0} failed, ${skipped:-0} skipped"
	[ "$failed" = 0 ] || die "$failed e2e run(s) failed (logs in $out)"
	;;
*) die "e2e.sh: mode must be demo, linux, bench, test, debug or fuzz" ;;
esac
