#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Turn a serial log holding KTAP (possibly behind printk timestamps) into a verdict:
# prints the KTAP lines and a summary; exits 0 only if the plan ran in full, every test
# passed and the kernel logged no oops, BUG, WARNING or panic.
#   ktap-summary.sh LOG NAME
set -uo pipefail
log=$1 name=$2
ktap=$(sed -E 's/\r$//; s/^\[ *[0-9]+\.[0-9]+\] //' "$log" |
	awk '/^KTAP version 1/ {on=1} on {print} /^# Totals:/ {on=0}')
printf '%s\n' "$ktap"
plan=$(printf '%s\n' "$ktap" | sed -nE 's/^1\.\.([0-9]+)$/\1/p' | head -n1)
skip=$(printf '%s\n' "$ktap" | grep -cE '^ok [0-9]+ .*# SKIP')
pass=$(($(printf '%s\n' "$ktap" | grep -cE '^ok [0-9]+ ') - skip))
fail=$(printf '%s\n' "$ktap" | grep -cE '^not ok [0-9]+ ')
bad=$(grep -nE 'Oops|BUG:|WARNING:|Kernel panic|general protection fault|Call Trace' "$log" | head -n 20)
verdict=ok
[ -n "$plan" ] || { verdict="no KTAP plan (the tests did not start)"; plan=0; }
[ "$verdict" = ok ] && [ $((pass + fail + skip)) -ne "$plan" ] && verdict="only $((pass + fail)) of $plan results (crash or timeout?)"
[ "$verdict" = ok ] && [ "$fail" -ne 0 ] && verdict="$fail failed"
[ "$verdict" = ok ] && [ -n "$bad" ] && verdict="kernel trouble in the log"
[ -n "$bad" ] && printf '%s\n' "--- kernel trouble:" "$bad"
echo "== $name: $pass passed, $fail failed, $skip skipped of $plan: $verdict (log: $log)"
[ "$verdict" = ok ]
