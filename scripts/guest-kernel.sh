#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Configure and build the Linux guest kernel that rvmm-run boots (kernel/guest.config on
# top of tinyconfig: no modules, no Rust), from the same kernel source as the host kernel,
# into a cache outside the repo keyed by hash(fragment, this script, source identity).
# Prints the path of its bzImage on stdout.
#
#   GUEST_BZIMAGE=<file>   use that bzImage as it is (nothing is built)
#   KSRC=<source tree>     build from that source (as scripts/kernel.sh)
#   KDIR=<built tree>      build from KDIR's source (KDIR/source, or KDIR itself)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

if [ -n "${GUEST_BZIMAGE:-}" ]; then
	[ -f "$GUEST_BZIMAGE" ] && [ "$(dd if="$GUEST_BZIMAGE" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] ||
		die "GUEST_BZIMAGE=$GUEST_BZIMAGE is not a bzImage" "point it at arch/x86/boot/bzImage of a built x86 kernel"
	echo "$GUEST_BZIMAGE"
	exit 0
fi

FRAGMENT=$RVMM_ROOT/kernel/guest.config
if [ -n "${KSRC:-}" ]; then
	src=$KSRC
elif [ -n "${KDIR:-}" ]; then
	src=$KDIR
	[ -d "$KDIR/source" ] && src=$(readlink -f "$KDIR/source")
else
	host=$(bash "$RVMM_ROOT/scripts/kernel.sh")
	src=$(dirname "$host")/src
fi
[ -f "$src/Makefile" ] && [ -d "$src/arch/x86" ] || die "no kernel source at $src" "pass KSRC=<Linux source tree>"
kver=$(make -s -C "$src" kernelversion 2>/dev/null) || die "cannot read the kernel version of $src"

# Bump RECIPE when this script changes how the guest kernel is configured or built.
RECIPE=1
key=$( (cat "$FRAGMENT"; echo "recipe=$RECIPE src=$src") | sha256sum | cut -c1-12)
build=$RVMM_CACHE/guest-kernel/$kver-$key
bz=$build/arch/x86/boot/bzImage
if [ -f "$build/.rvmm-built" ]; then
	log "guest kernel cached: $bz"
	echo "$bz"
	exit 0
fi
mkdir -p "$build"
step "configure guest kernel $kver (tinyconfig + kernel/guest.config)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -s tinyconfig >"$build/config.log" 2>&1 || die "make tinyconfig failed (log: $build/config.log)"
(cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m .config "$FRAGMENT" >>"$build/config.log" 2>&1) || die "merge_config failed (log: $build/config.log)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -s olddefconfig >>"$build/config.log" 2>&1 || die "make olddefconfig failed (log: $build/config.log)"
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*) grep -qxF "$line" "$build/.config" || die "guest kernel config lost '$line' (log: $build/config.log)" "fix kernel/guest.config: a dependency is missing" ;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }
		opt=${opt%% *}
		! grep -q "^$opt=" "$build/.config" || die "guest kernel config has $opt set, kernel/guest.config says not" "fix kernel/guest.config" ;;
	esac
done <"$FRAGMENT"
step_done
step "build guest kernel with -j$(nproc) (about 3-5 min fresh; log: $build/build.log)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -j"$(nproc)" bzImage >"$build/build.log" 2>&1 ||
	{ tail -n 30 "$build/build.log" >&2; die "guest kernel build failed (log: $build/build.log)"; }
touch "$build/.rvmm-built"
step_done
echo "$bz"
