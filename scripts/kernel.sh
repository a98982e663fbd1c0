#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Fetch, patch, configure and build the host kernel rvmm runs on, into a cache outside
# the repo keyed by kernel version + hash(config fragment, patches, this script).
# Prints the build directory (a KDIR for module builds) on stdout.
#
#   KDIR=<built tree>      use that tree as it is (nothing is fetched or built)
#   KSRC=<source tree>     build that source (with rvmm's patch + fragment) instead of
#                          the pinned Debian package
#   RVMM_KERNEL_FLAVOR=debug  (or the argument "debug") the debug flavor: kernel/debug.config
#                          (KASAN, lockdep, UBSAN, ...) merged after kernel/host.config,
#                          cached under <version>-debug-<hash>; DEBUG_KDIR=<built tree>
#                          uses yours instead (KDIR is the default flavor's)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

KVER_PKG=${KVER_PKG:-linux-source-7.3}
KVER_PIN=${KVER_PIN:-7.3.4-1~bpo13+1}
KSUITE=trixie-backports
FRAGMENT=$RVMM_ROOT/kernel/host.config
PATCHES=("$RVMM_ROOT"/kernel/patches/*.patch)
flavor=${1:-${RVMM_KERNEL_FLAVOR:-default}}
case $flavor in
default) FRAGMENTS=("$FRAGMENT") ;;
debug)
	FRAGMENTS=("$FRAGMENT" "$RVMM_ROOT/kernel/debug.config")
	KDIR=${DEBUG_KDIR:-}
	;;
*) die "kernel flavor must be default or debug, not '$flavor'" ;;
esac

if [ -n "${KDIR:-}" ]; then
	[ -f "$KDIR/Module.symvers" ] || die "KDIR=$KDIR is not a built kernel tree (no Module.symvers)" \
		"build it, or unset KDIR to let rvmm build its own kernel"
	for sym in x86_virt_get_ref clear_bhb_loop; do
		grep -q "$sym.*rvmm" "$KDIR/Module.symvers" ||
			die "KDIR=$KDIR lacks rvmm's kernel patch ($sym is not exported to rvmm)" \
				"apply kernel/patches/*.patch to its source and rebuild, or pass KSRC=<source> instead"
	done
	echo "$KDIR"
	exit 0
fi

# Bump RECIPE when this script changes how the kernel is configured or built.
RECIPE=1
# The default flavor's key is what it always was (its cached kernel stays valid).
if [ "$flavor" = default ]; then
	key=$( (cat "$FRAGMENT" "${PATCHES[@]}"; echo "recipe=$RECIPE ${KSRC:-$KVER_PKG=$KVER_PIN}") | sha256sum | cut -c1-12)
	tag=""
else
	key=$( (cat "${FRAGMENTS[@]}" "${PATCHES[@]}"; echo "recipe=$RECIPE flavor=$flavor ${KSRC:-$KVER_PKG=$KVER_PIN}") | sha256sum | cut -c1-12)
	tag=$flavor-
fi
if [ -n "${KSRC:-}" ]; then
	name=custom-$tag$key
else
	name=${KVER_PIN%%-*}-$tag$key
fi
dir=$RVMM_CACHE/kernel/$name
build=$dir/build

if [ -f "$build/.rvmm-built" ]; then
	log "kernel$([ "$flavor" = default ] || echo " ($flavor)") cached: $build"
	echo "$build"
	exit 0
fi
mkdir -p "$dir"

# --- source -------------------------------------------------------------------------
if [ -n "${KSRC:-}" ]; then
	[ -f "$KSRC/Makefile" ] && [ -d "$KSRC/arch/x86" ] || die "KSRC=$KSRC is not a kernel source tree" "point KSRC at an unpacked Linux source"
	src=$KSRC
else
	src=$dir/src
	if [ ! -f "$src/.rvmm-unpacked" ]; then
		debdir=$RVMM_CACHE/deb
		mkdir -p "$debdir"
		deb=$(ls "$debdir"/${KVER_PKG}_*.deb 2>/dev/null | grep -F -e "_${KVER_PIN}_" -e "_${KVER_PIN//\~/%7e}_" | head -n1 || true)
		if [ -z "$deb" ]; then
			step "download $KVER_PKG=$KVER_PIN from Debian $KSUITE (167 MB)"
			# Reuse the URI of this machine's own Debian source: no host name is written here.
			uri=$(grep -hoE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]*/debian/?([[:space:]]|$)' \
				/etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
				grep -oE '[a-z]+://[^[:space:]]*' | head -n1 || true)
			[ -n "$uri" ] || die "no Debian archive URI found in /etc/apt/sources.list{,.d}" \
				"add a Debian source, or fetch a 7.3 source yourself and pass KSRC=<dir>"
			apt=$RVMM_CACHE/apt-$KSUITE
			mkdir -p "$apt/lists/partial"
			echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $KSUITE main" >"$apt/sources.list"
			aptopts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$apt/lists" -o APT::Get::List-Cleanup=0)
			apt-get "${aptopts[@]}" update -q >"$apt/update.log" 2>&1 || die "apt-get update of $KSUITE failed (log: $apt/update.log)" "check network access to the Debian archive"
			(cd "$debdir" && apt-get "${aptopts[@]}" download "$KVER_PKG=$KVER_PIN" >"$apt/download.log" 2>&1) ||
				die "$KVER_PKG=$KVER_PIN could not be downloaded (log: $apt/download.log)" \
					"the pinned version may be gone from $KSUITE: list versions with 'apt-cache ${aptopts[*]} madison $KVER_PKG', set KVER_PIN, or pass KSRC=<source tree>"
			deb=$(ls "$debdir"/${KVER_PKG}_*.deb | head -n1)
			step_done
		fi
		step "unpack $(basename "$deb") (1.8 GB)"
		rm -rf "$src" "$dir/deb"
		dpkg-deb -x "$deb" "$dir/deb"
		tarball=$(ls "$dir"/deb/usr/src/linux-source-*.tar.xz)
		mkdir -p "$src"
		tar -xf "$tarball" -C "$src" --strip-components=1
		rm -rf "$dir/deb"
		touch "$src/.rvmm-unpacked"
		step_done
	fi
fi

# --- patch ----------------------------------------------------------------------------
for p in "${PATCHES[@]}"; do
	if patch -d "$src" -p1 -R --dry-run -s -f <"$p" >/dev/null 2>&1; then
		log "patch already applied: $(basename "$p")"
	else
		log "applying $(basename "$p") to $src"
		patch -d "$src" -p1 -s -f <"$p" || die "patch $(basename "$p") does not apply to $src" \
			"rvmm's patch is written against Linux 7.3; use the pinned source or adapt the patch"
	fi
done

# --- configure and build ------------------------------------------------------------------
mkdir -p "$build"
step "configure kernel (tinyconfig + ${FRAGMENTS[*]#"$RVMM_ROOT"/})"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -s tinyconfig >"$dir/config.log" 2>&1 || die "make tinyconfig failed (log: $dir/config.log)"
(cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m .config "${FRAGMENTS[@]}" >>"$dir/config.log" 2>&1) || die "merge_config failed (log: $dir/config.log)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -s olddefconfig >>"$dir/config.log" 2>&1 || die "make olddefconfig failed (log: $dir/config.log)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" rustavailable >>"$dir/config.log" 2>&1 ||
	die "the kernel says Rust is not available (log: $dir/config.log)" "run scripts/setup-host.sh (rustc-web, rust-web-src, bindgen-cli, libclang-19-dev)"
# Every option of the fragments must have survived olddefconfig (a dropped one means a
# missing dependency, and a kernel that silently lacks something rvmm needs).
for f in "${FRAGMENTS[@]}"; do
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*) grep -qxF "$line" "$build/.config" || die "kernel config lost '$line' (log: $dir/config.log)" "fix ${f#"$RVMM_ROOT"/}: a dependency is missing" ;;
		"# CONFIG_"*" is not set")
			opt=${line#"# "}
			opt=${opt%" is not set"}
			! grep -q "^$opt=" "$build/.config" || die "kernel config has $(grep "^$opt=" "$build/.config") against '$line' (log: $dir/config.log)" "fix ${f#"$RVMM_ROOT"/}: something selects it"
			;;
		esac
	done <"$f"
done
step_done

step "build $([ "$flavor" = default ] || echo "$flavor ")kernel with -j$(nproc) (about $([ "$flavor" = default ] && echo 4-7 || echo 8-15) min fresh; log: $dir/build.log)"
make -C "$src" O="$build" "${KMAKE_VARS[@]}" -j"$(nproc)" bzImage modules >"$dir/build.log" 2>&1 ||
	{ tail -n 30 "$dir/build.log" >&2; die "kernel build failed (log: $dir/build.log)"; }
for sym in x86_virt_get_ref clear_bhb_loop; do
	grep -q "$sym.*rvmm" "$build/Module.symvers" || die "built kernel does not export $sym to rvmm" "check kernel/patches"
done
touch "$build/.rvmm-built"
step_done
echo "$build"
