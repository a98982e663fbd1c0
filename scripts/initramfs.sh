#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build the test initramfs: busybox, rvmm.ko (+ KVM's modules for comparison tests),
# rvmm-run, the kselftest binary, the guest images, and the Linux guest (the guest
# kernel's bzImage and its own initramfs). Usage: initramfs.sh KDIR OUT.cpio.gz
set -euo pipefail
. "$(dirname "$0")/lib.sh"
kdir=$1 out=$2
bin=$RVMM_ROOT/target/x86_64-unknown-linux-gnu/release
for f in "$RVMM_ROOT/rvmm.ko" "$bin/rvmm-run" "$bin/rvmm_test" /bin/busybox; do
	[ -f "$f" ] || die "initramfs: $f is missing" "run 'make module userspace selftests' first"
done
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || die "/bin/busybox is not static" "apt-get install busybox-static"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules/rvmm}
cp /bin/busybox "$root/bin/busybox"
install -m 755 "$RVMM_ROOT/scripts/guest/init" "$root/init"
cp "$bin/rvmm-run" "$bin/rvmm_test" "$root/bin/"
cp "$RVMM_ROOT/rvmm.ko" "$root/lib/modules/rvmm/"
for ko in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-intel.ko; do
	[ -f "$kdir/$ko" ] || die "initramfs: $kdir/$ko is missing" "the kernel config must build KVM and KVM_INTEL as modules (kernel/host.config)"
	cp "$kdir/$ko" "$root/lib/modules/rvmm/"
done
mkdir -p "$root/lib/rvmm/guests"
ls "$RVMM_ROOT"/target/guests/*.elf >/dev/null 2>&1 || die "initramfs: no guest images in target/guests" "run 'make -C selftests/guests'"
cp "$RVMM_ROOT"/target/guests/*.elf "$RVMM_ROOT"/target/guests/*.bin "$root/lib/rvmm/guests/"
cp "$RVMM_ROOT"/selftests/guests/expected/* "$root/lib/rvmm/guests/"
mkdir -p "$root/lib/rvmm/bench"
cp "$RVMM_ROOT"/target/bench/*.elf "$root/lib/rvmm/bench/" 2>/dev/null || true
mkdir -p "$root/lib/rvmm/linux"
guest_bz=$(bash "$RVMM_ROOT/scripts/guest-kernel.sh")
cp "$guest_bz" "$root/lib/rvmm/linux/bzImage"
bash "$RVMM_ROOT/scripts/guest-initramfs.sh" "$root/lib/rvmm/linux/initrd.gz"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out"
