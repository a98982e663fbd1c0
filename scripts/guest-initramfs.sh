#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build the initramfs of the Linux guest that rvmm-run boots: static busybox, the guest
# init (selftests/linux/init) and the workload (rvmm-workload). Usage: guest-initramfs.sh OUT
set -euo pipefail
. "$(dirname "$0")/lib.sh"
out=$1
work=$RVMM_ROOT/target/x86_64-unknown-linux-gnu/release/rvmm-workload
[ -f "$work" ] || die "guest initramfs: $work is missing" "run 'make selftests' first"
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || die "/bin/busybox is not static" "apt-get install busybox-static"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,etc,proc,sys,tmp,usr/bin,usr/sbin}
cp /bin/busybox "$root/bin/busybox"
cp "$work" "$root/bin/rvmm-workload"
install -m 755 "$RVMM_ROOT/selftests/linux/init" "$root/init"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out"
