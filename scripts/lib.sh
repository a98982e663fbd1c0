# SPDX-License-Identifier: GPL-2.0
# Shared helpers for rvmm's scripts: step logging with timings, clear failures, paths.

RVMM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RVMM_CACHE=${RVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rvmm}
mkdir -p "$RVMM_CACHE"

# Kernel toolchain, as measured in shared/PLATFORM.md: Debian's rustc-web (sysroot /usr)
# and clang-19. The rustup toolchain has no rust-src and must not build kernel code.
KMAKE_VARS=(LLVM=-19 RUSTC=/usr/bin/rustc "BINDGEN=${BINDGEN:-$HOME/.cargo/bin/bindgen}"
	LIBCLANG_PATH=/usr/lib/llvm-19/lib)

_rvmm_step_name=""
_rvmm_step_t0=0

log() { printf '[rvmm] %s\n' "$*" >&2; }

# step "what": announce a long step; step_done reports how long it took.
step() {
	_rvmm_step_name=$1
	_rvmm_step_t0=$(date +%s)
	printf '[rvmm] ==> %s\n' "$1" >&2
}

step_done() {
	local dt=$(($(date +%s) - _rvmm_step_t0))
	printf '[rvmm] <== %s (%dm%02ds)\n' "$_rvmm_step_name" $((dt / 60)) $((dt % 60)) >&2
}

# die "what failed" "what to do"
die() {
	printf '[rvmm] ERROR: %s\n' "$1" >&2
	[ -n "${2:-}" ] && printf '[rvmm]   fix: %s\n' "$2" >&2
	exit 1
}

need_root() {
	[ "$(id -u)" = 0 ] || die "$1 needs root (apt-get)" "run it as root or with sudo"
}

# mirror_module_sources DEST: the module's sources (Kbuild, build/crates.mk, rvmm/ but
# rvmm/core, whose crate build/crates.mk names by absolute path) copied into DEST, so
# that rvmm.ko can be built against a second kernel with M=DEST while the repo root keeps
# the default kernel's in-tree objects (Kbuild's MO= refuses a source tree holding
# objects). Only files whose content changed are copied (they get a new mtime: Kbuild
# rebuilds just those); files gone from the repo go from DEST.
mirror_module_sources() {
	local dest=$1 f
	mkdir -p "$dest"
	(cd "$RVMM_ROOT" && { echo Kbuild; echo build/crates.mk; find rvmm -path rvmm/core -prune -o -type f \( -name '*.rs' -o -name '*.c' -o -name '*.h' \) -print; }) |
		while IFS= read -r f; do
			cmp -s "$RVMM_ROOT/$f" "$dest/$f" || { mkdir -p "$(dirname "$dest/$f")" && cp "$RVMM_ROOT/$f" "$dest/$f"; }
		done
	[ -d "$dest/rvmm" ] || return 0
	(cd "$dest" && find rvmm -type f \( -name '*.rs' -o -name '*.c' -o -name '*.h' \) -print) |
		while IFS= read -r f; do
			[ -e "$RVMM_ROOT/$f" ] || rm -f "$dest/$f"
		done
}
