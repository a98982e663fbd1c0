#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# All of rvmm's tests: host unit/property tests (cargo), then the kselftests in Bochs
# (VT-x, 1 and 2 CPUs), the no-VT-x check in QEMU, and the adversarial kselftests and the
# fuzzer on the debug kernel (KASAN, lockdep, UBSAN; RVMM_E2E_DEBUG_CPUS="" skips it).
# Installs and builds what is missing first. Exit status 0 only if everything passed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$RVMM_ROOT"
t0=$(date +%s)

bash scripts/setup-host.sh

step "host tests: cargo fmt --check, cargo clippy, cargo test (no_std core, uapi ABI/header, guest images on host KVM)"
cargo fmt --all --check || die "code is not rustfmt-formatted" "run 'cargo fmt --all' (and rustfmt rvmm/*.rs)"
rustfmt --check --edition 2021 rvmm/*.rs || die "rvmm/*.rs is not rustfmt-formatted" "run 'rustfmt --edition 2021 rvmm/*.rs'"
cargo clippy --locked --quiet --workspace --all-targets -- -D warnings ||
	die "clippy warns about the host crates (rvmm-core, uapi, userspace, selftests)" "fix what it says"
make --no-print-directory -C selftests/guests >/dev/null
cargo test --locked --workspace 2>&1 | tee build-host-tests.log
host_passed=$(sed -nE 's/^test result: .* ([0-9]+) passed; ([0-9]+) failed.*/\1/p' build-host-tests.log | paste -sd+ | bc)
host_failed=$(sed -nE 's/^test result: .* ([0-9]+) passed; ([0-9]+) failed.*/\2/p' build-host-tests.log | paste -sd+ | bc)
rm -f build-host-tests.log
step_done

step "build kernel (cached), rvmm.ko, rvmm-run, selftests, the Linux guest kernel (cached)"
make --no-print-directory module userspace selftests
bash scripts/guest-kernel.sh >/dev/null
step_done

# The debug kernel (kernel/debug.config: KASAN, lockdep, UBSAN): about 15 min fresh.
if [ -n "${RVMM_E2E_DEBUG_CPUS-1}" ]; then
	step "build the debug kernel (cached) and rvmm.ko for it (build/debug-module)"
	make --no-print-directory module-debug
	step_done
fi

e2e_log=$(mktemp)
trap 'rm -f "$e2e_log"' EXIT
rc=0
bash scripts/e2e.sh test 2>&1 | tee "$e2e_log" || rc=$?
e2e=$(sed -nE 's/^e2e: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped$/\1 \2 \3/p' "$e2e_log" | tail -n1)
read -r e2e_passed e2e_failed e2e_skipped <<<"$e2e"
[ -n "$e2e" ] || { e2e_passed=0 e2e_failed=1 e2e_skipped=0; }
dt=$(($(date +%s) - t0))
log "all tests done in $((dt / 60))m$((dt % 60))s: host $host_passed passed, $host_failed failed; e2e $e2e_passed passed, $e2e_failed failed"
echo "rvmm: $((host_passed + e2e_passed)) passed, $((host_failed + e2e_failed)) failed, $e2e_skipped skipped"
[ "$rc" = 0 ] && [ "$host_failed" = 0 ] && [ "$e2e_failed" = 0 ]
