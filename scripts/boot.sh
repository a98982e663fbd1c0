#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Boot the host kernel + test initramfs headless and capture the serial console.
#
#   boot.sh bochs|qemu --kdir DIR --initrd FILE --job JOB --log FILE [--cpus N]
#           [--timeout SEC] [--append "extra kernel args"] [--interactive]
#
# --interactive (Bochs): the serial console is this terminal instead of the log file.
#
# Bochs 2.7 is the VT-x machine (Haswell model, VMX with EPT); QEMU TCG has no VMX and
# boots in seconds. The run is judged by its serial log, not the emulator's exit status
# (Bochs reports the guest's ACPI power-off as a "panic").
set -euo pipefail
. "$(dirname "$0")/lib.sh"

emu=$1
shift
cpus=1 timeout=600 append="" kdir="" initrd="" job="" log="" interactive=""
while [ $# -gt 0 ]; do
	case $1 in
	--kdir) kdir=$2 ;;
	--initrd) initrd=$2 ;;
	--job) job=$2 ;;
	--log) log=$2 ;;
	--cpus) cpus=$2 ;;
	--timeout) timeout=$2 ;;
	--append) append=$2 ;;
	--interactive)
		interactive=$(tty) || die "boot.sh --interactive needs a terminal on stdin"
		shift
		continue
		;;
	*) die "boot.sh: unknown option $1" ;;
	esac
	shift 2
done
log=$(realpath -m "$log"); initrd=$(realpath -m "$initrd")
[ -n "$kdir" ] && [ -n "$initrd" ] && [ -n "$job" ] && [ -n "$log" ] || die "boot.sh: --kdir, --initrd, --job and --log are required"
bz=$kdir/arch/x86/boot/bzImage
cmdline="console=ttyS0,115200 printk.devkmsg=on panic=-1 oops=panic rvmm_job=$job $append"
work=$(mktemp -d)
# Bochs's own log (its VMFAIL/VMENTER FAIL reasons) is kept beside the serial log.
# (Without the host kernel's APERF/MPERF reads, which Bochs logs by the thousand.)
trap '[ ! -f "$work/bochs.log" ] || grep -v "Unknown register 0xe[78]$" "$work/bochs.log" | tail -n 2000 >"$log.bochs" || true; rm -rf "$work"' EXIT
: >"$log"

case $emu in
qemu)
	timeout --foreground -k 5 "$timeout" qemu-system-x86_64 -M pc -cpu qemu64 -smp "$cpus" -m 256 \
		-kernel "$bz" -initrd "$initrd" -append "$cmdline" \
		-display none -serial "file:$log" -monitor none -no-reboot </dev/null >"$work/qemu.out" 2>&1 ||
		{ rc=$?; [ $rc = 124 ] && log "QEMU timed out after ${timeout}s"; }
	;;
bochs)
	mkdir -p "$work/iso/isolinux"
	cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$work/iso/isolinux/"
	cp "$bz" "$work/iso/bzImage"
	cp "$initrd" "$work/iso/initrd.gz"
	cat >"$work/iso/isolinux/isolinux.cfg" <<-CFG
	SERIAL 0 115200
	DEFAULT linux
	PROMPT 0
	LABEL linux
	  KERNEL /bzImage
	  INITRD /initrd.gz
	  APPEND $cmdline
	CFG
	xorriso -as mkisofs -quiet -o "$work/boot.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
		-no-emul-boot -boot-load-size 4 -boot-info-table "$work/iso" 2>"$work/xorriso.log" ||
		die "xorriso failed (log: $work/xorriso.log)"
	# Measured settings: shared/PLATFORM.md ("Booting it").
	cat >"$work/bochsrc" <<-RC
	megs: 256
	cpu: model=corei7_haswell_4770, count=$cpus, ips=200000000
	clock: sync=none
	romimage: file=/usr/share/bochs/BIOS-bochs-latest
	vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
	ata0-master: type=cdrom, path=$work/boot.iso, status=inserted
	boot: cdrom
	com1: enabled=1, $([ -n "$interactive" ] && echo "mode=term, dev=$interactive" || echo "mode=file, dev=$log")
	display_library: rfb, options="timeout=0"
	sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
	speaker: enabled=0
	log: $work/bochs.log
	panic: action=fatal
	error: action=report
	RC
	# Debian's Bochs has its debugger built in: 'c' continues from the first instruction.
	echo c | (cd "$work" && timeout --foreground -k 5 "$timeout" bochs -q -f "$work/bochsrc") >"$work/bochs.out" 2>&1 ||
		{ rc=$?; [ $rc = 124 ] && log "Bochs timed out after ${timeout}s"; }
	[ -n "$interactive" ] || grep -q "RVMM-INIT" "$log" || { log "Bochs output:"; tail -n 20 "$work/bochs.out" >&2; tail -n 20 "$work/bochs.log" >&2; }
	;;
*) die "boot.sh: emulator must be bochs or qemu, not $emu" ;;
esac
