#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install everything rvmm needs on a Debian 12 host: the kernel toolchain (rustc-web,
# clang-19, bindgen-cli), Bochs (our VT-x machine), QEMU (fast non-VMX boots), the ISO
# and initramfs tools. Idempotent: a stamp in the cache skips work already done.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PACKAGES=(
	# kernel build
	rustc-web rust-web-src clang-19 lld-19 llvm-19 libclang-19-dev bc flex bison
	libelf-dev libssl-dev cpio xz-utils kmod make gcc python3 zstd
	# emulators and boot media
	bochs bochsbios vgabios qemu-system-x86 isolinux syslinux-common xorriso
	busybox-static
)
BINDGEN_VERSION=0.73.2

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	need_root "installing ${missing[*]}"
	step "apt-get install ${#missing[@]} packages (${missing[*]})"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null || die "apt-get update failed" "check the apt sources and the network"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >"$RVMM_CACHE/apt.log" 2>&1 ||
		die "apt-get install failed (log: $RVMM_CACHE/apt.log)" "read the log; every package is in Debian 12's main suites"
	step_done
fi

[ -x /usr/bin/rustc ] || die "/usr/bin/rustc missing after installing rustc-web" "apt-get install rustc-web"

bindgen=${BINDGEN:-$HOME/.cargo/bin/bindgen}
if ! "$bindgen" --version 2>/dev/null | grep -q "$BINDGEN_VERSION"; then
	command -v cargo >/dev/null || die "cargo not found" "install Rust with rustup (cargo is used for bindgen-cli and the userspace crates)"
	step "cargo install bindgen-cli $BINDGEN_VERSION (about 2 min)"
	LIBCLANG_PATH=/usr/lib/llvm-19/lib cargo install -q bindgen-cli --version "$BINDGEN_VERSION" --locked ||
		die "cargo install bindgen-cli failed" "check crates.io access; LIBCLANG_PATH=/usr/lib/llvm-19/lib must hold libclang"
	step_done
fi
# The host crates are linted and formatted (scripts/test.sh).
if command -v rustup >/dev/null && ! cargo clippy --version >/dev/null 2>&1; then
	step "rustup component add clippy rustfmt"
	rustup component add clippy rustfmt || die "rustup component add failed" "run: rustup component add clippy rustfmt"
	step_done
fi
log "host set-up complete"
