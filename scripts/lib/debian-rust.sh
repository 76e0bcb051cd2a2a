# Sourced by scripts/cross-test and scripts/package: Debian's Rust toolchain
# (rustc-web/cargo-web) with its cross linkers and qemu-user. The rustup
# toolchain has no foreign std and this machine cannot download one, so cross
# builds use /usr/bin/rustc and /usr/bin/cargo, in their own target dir so they
# never invalidate the native builds in target/.
#   aarch64: std from the multiarch package libstd-rust-web-dev:arm64.
#   armv7:   std built from Debian's own std sources (rust-web-src) with
#            -Zbuild-std; no armhf apt architecture (its security index often
#            can't be fetched here, and nothing else of armhf is needed).
#
# Environment:
#   PULSEBELL_CROSS_TARGET_DIR  cargo target dir for cross builds (default target/cross)

AARCH64=aarch64-unknown-linux-gnu
ARMV7=armv7-unknown-linux-gnueabihf
CROSS_TARGET_DIR=${PULSEBELL_CROSS_TARGET_DIR:-$PWD/target/cross}
# Builds with std from source (-Zbuild-std: every armv7 build, and the
# agent-release builds of both targets, whose std then gets the profile's
# opt-level "z" and LTO together with the agent: aarch64 2.04 MB instead of
# 2.10 MB with the prebuilt std) have a target dir of their own, inside the
# cross one: they need RUSTC_BOOTSTRAP=1 (below), and build scripts that watch
# it (proc-macro2, anyhow, thiserror: rerun-if-env-changed=RUSTC_BOOTSTRAP)
# would otherwise rebuild every shared host crate, and everything after them,
# each time the two kinds of build take turns.
BUILD_STD_TARGET_DIR=$CROSS_TARGET_DIR/build-std
# armv7: std is built from source with each profile (test and agent-release).
BUILD_STD=std,panic_abort
# In the test profile std would be built at opt-level 0 with debug assertions,
# and the emulated unit tests would then take ~2.5x as long (the journal test:
# 111 s of CPU instead of 45 s under qemu-arm). Build std optimised, like the
# prebuilt std the aarch64 tests link; the workspace and its dependencies keep
# the test profile (except hashbrown: the override goes by package name). The
# overrides are for `dev`/`test` only: agent-release builds std its own way.
ARMV7_STD_PROFILE=()
for _p in core alloc std hashbrown; do
    for _kv in opt-level=2 debug-assertions=false overflow-checks=false debug=false; do
        ARMV7_STD_PROFILE+=(--config "profile.dev.package.$_p.$_kv")
    done
done
unset _p _kv
# armhf libraries for qemu-arm: the loader and libc of libc6-armhf-cross (the
# same ones the binary is linked against).
ARMHF_ROOT=/usr/arm-linux-gnueabihf

# cargo with Debian's rustc. qemu-user runs the foreign test binaries.
# aarch64: no -L / QEMU_LD_PREFIX: libstd-rust-web-dev:arm64 pulls in the
# multiarch libc6:arm64, whose loader (/lib/ld-linux-aarch64.so.1) and libc come
# from the same package. Don't use `-L /usr/aarch64-linux-gnu`: that loader is
# libc6-arm64-cross's, which finds the multiarch libc.so.6 through
# /etc/ld.so.cache; when the two versions differ (2.36-8cross1 vs
# 2.36-9+deb12u14 here) the first pthread_create spins forever (every test
# binary hangs).
# armv7: no multiarch libc6:armhf is installed, so QEMU_LD_PREFIX points qemu at
# libc6-armhf-cross (loader and libc from one package).
dcargo() {
    env RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR="${DCARGO_TARGET_DIR:-$CROSS_TARGET_DIR}" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static \
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER="env QEMU_LD_PREFIX=$ARMHF_ROOT qemu-arm-static" \
        /usr/bin/cargo "$@"
}

# cargo SUBCOMMAND for one cross target: xcargo TARGET SUBCOMMAND ARGS...
# armv7 adds -Zbuild-std (xcargo_std); aarch64 links Debian's prebuilt std.
xcargo() {
    local target=$1
    case $target in
        "$ARMV7") xcargo_std "$@" ;;
        *) local sub=$2; shift 2; dcargo "$sub" --target "$target" "$@" ;;
    esac
}

# cargo SUBCOMMAND with std built from Debian's std sources:
# xcargo_std TARGET SUBCOMMAND ARGS... (RUSTC_BOOTSTRAP=1 lets the stable
# rustc/cargo accept -Z; only these builds get it, in their own target dir,
# so the other builds' fingerprints stay as they are).
xcargo_std() {
    local target=$1 sub=$2
    shift 2
    RUSTC_BOOTSTRAP=1 DCARGO_TARGET_DIR=$BUILD_STD_TARGET_DIR \
        dcargo "$sub" -Zbuild-std="$BUILD_STD" "${ARMV7_STD_PROFILE[@]}" --target "$target" "$@"
}

# The release agent for a board: agent_release TARGET [cargo args...]; its
# binary is at $BUILD_STD_TARGET_DIR/TARGET/agent-release/pulsebell-agent.
# std's features: `optimize_for_size` (core and alloc pick their smaller
# algorithms) and not `backtrace` (no symbolizer: addr2line, gimli, object and
# miniz_oxide stay out; a panic still prints its message and location, and
# RUST_BACKTRACE=1 raw addresses). aarch64 2,168,984 -> 2,035,544 B with checks.
AGENT_STD_FEATURES=optimize_for_size
agent_release() {
    local target=$1
    shift
    xcargo_std "$target" build --locked --profile agent-release -p pulsebell-agent \
        -Zbuild-std-features="$AGENT_STD_FEATURES" "$@"
}

# The agent as the packages ship it: statically linked against musl, so it has
# no glibc floor (any Raspberry Pi OS or Debian release runs it) and maps no
# libc.so, ld.so or libgcc_s at run time (peak RSS ~2.5 MiB instead of ~4.3 MiB,
# BENCHMARKS.md). Names still resolve through the system's NSS (mDNS `.local`
# names too): agent/src/resolve.rs asks `getent ahosts`.
# std is built from Debian's std sources as for the glibc builds; musl's start
# files and libc.a come from Debian's musl-dev for arm64/armhf (setup_musl),
# crtbegin/crtend from the GNU cross gcc, which links (rustc passes the start
# files and libraries itself). std's unwind crate links a static libunwind:
# LLVM's, from Debian's libunwind-14-dev for the board, as rustup's musl
# targets bring it (the _Unwind_* symbols std keeps for backtraces, and on
# 32-bit ARM the EHABI personality routines every unwind table names; gcc's
# libgcc_eh won't do on aarch64: it calls glibc's _dl_find_object).
LLVM_UNWIND=libunwind-14-dev
AARCH64_MUSL=aarch64-unknown-linux-musl
ARMV7_MUSL=armv7-unknown-linux-musleabihf
MUSL_DIR=$CROSS_TARGET_DIR/musl
# TARGET -> "debian-arch musl-triplet gnu-triplet"
declare -A MUSL_SPEC=([$AARCH64_MUSL]="arm64 aarch64-linux-musl aarch64-linux-gnu"
    [$ARMV7_MUSL]="armhf arm-linux-musleabihf arm-linux-gnueabihf")

# apt with a private sources list, lists dir and architectures: downloads
# foreign packages checked against Debian's signed index without adding an
# apt architecture to this machine.
musl_apt() {
    apt-get -q -o Dir::Etc::SourceList="$MUSL_DIR/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
        -o Dir::State::Lists="$MUSL_DIR/apt/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        -o APT::Architectures::=arm64 -o APT::Architectures::=armhf -o Acquire::Languages=none "$@"
}

# musl-dev for both boards, unpacked into $MUSL_DIR/TARGET with the gcc
# objects beside it. Mandatory (after setup_debian_rust_arm64/armv7).
setup_musl() {
    local target arch triplet gnu dir need=()
    for target in "$AARCH64_MUSL" "$ARMV7_MUSL"; do
        [ -f "$MUSL_DIR/$target/libc.a" ] || need+=("$target")
    done
    [ ${#need[@]} -gt 0 ] || { echo "musl for ${!MUSL_SPEC[*]} already unpacked in $MUSL_DIR"; return 0; }
    mkdir -p "$MUSL_DIR/apt/lists/partial" "$MUSL_DIR/debs"
    echo "deb [arch=arm64,armhf] http://deb.debian.org/debian bookworm main" >"$MUSL_DIR/apt/sources.list"
    apt_update musl_apt || { echo "FAIL: apt-get update for musl-dev (arm64, armhf)" >&2; return 1; }
    for target in "${need[@]}"; do
        read -r arch triplet gnu <<<"${MUSL_SPEC[$target]}"
        (cd "$MUSL_DIR/debs" && musl_apt download "musl-dev:$arch" "$LLVM_UNWIND:$arch" >/dev/null 2>&1) \
            || { echo "FAIL: apt-get download musl-dev:$arch $LLVM_UNWIND:$arch" >&2; return 1; }
        dir=$MUSL_DIR/$target
        rm -rf "$dir" "$dir.x"
        dpkg-deb -x "$(ls "$MUSL_DIR"/debs/musl-dev_*_"$arch".deb | tail -1)" "$dir.x"
        dpkg-deb -x "$(ls "$MUSL_DIR"/debs/"$LLVM_UNWIND"_*_"$arch".deb | tail -1)" "$dir.x"
        mkdir -p "$dir"
        cp "$dir.x/usr/lib/$triplet"/*.o "$dir.x/usr/lib/$triplet/libc.a" "$dir/"
        local o
        for o in crtbegin.o crtbeginS.o crtbeginT.o crtend.o crtendS.o; do
            cp "$(ls /usr/lib/gcc-cross/"$gnu"/*/"$o" | tail -1)" "$dir/"
        done
        cp "$(ls "$dir".x/usr/lib/llvm-*/lib/libunwind.a | tail -1)" "$dir/libunwind.a"
        rm -rf "$dir.x"
        echo "musl-dev:$arch unpacked for $target: $(ls "$dir" | tr '\n' ' ')"
    done
}

# The static release agent: agent_release_musl TARGET [cargo args...]; its
# binary is at $BUILD_STD_TARGET_DIR/TARGET/agent-release/pulsebell-agent.
agent_release_musl() {
    local target=$1 arch triplet gnu t
    shift
    read -r arch triplet gnu <<<"${MUSL_SPEC[$target]}"
    t=${target//-/_}
    (
        export "CC_$t=$gnu-gcc" "AR_$t=$gnu-ar" "CARGO_TARGET_${t^^}_LINKER=$gnu-gcc" \
            "CARGO_TARGET_${t^^}_RUSTFLAGS=-L native=$MUSL_DIR/$target"
        agent_release "$target" "$@"
    )
}

# Run a foreign binary: qemu_run TARGET BIN ARGS...
qemu_run() {
    local target=$1
    shift
    case $target in
        "$AARCH64") qemu-aarch64-static "$@" ;;
        "$ARMV7") QEMU_LD_PREFIX=$ARMHF_ROOT qemu-arm-static "$@" ;;
        "$AARCH64_MUSL") qemu-aarch64-static "$@" ;;
        "$ARMV7_MUSL") qemu-arm-static "$@" ;;
        *) echo "qemu_run: unknown target $target" >&2; return 1 ;;
    esac
}

installed_version() { { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }
candidate_version() { { apt-cache policy "$1" 2>/dev/null || true; } | awk '/Candidate:/ {print $2}'; }

# apt-get update (or APT, a wrapper such as musl_apt); returns non-zero if any
# index failed (apt prints E: lines).
apt_update() {
    local apt=${1:-apt-get} log
    log=$(mktemp)
    if "$apt" update -q >"$log" 2>&1 && ! grep -q '^E:' "$log"; then
        rm -f "$log"
        return 0
    fi
    grep -E '^(E|W):' "$log" | head -3 >&2
    rm -f "$log"
    return 1
}

export DEBIAN_FRONTEND=noninteractive

# Debian's rustc + arm64 std + aarch64 linker + qemu-user. Mandatory.
setup_debian_rust_arm64() {
    local pkgs=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
        binutils-aarch64-linux-gnu qemu-user-static)
    local p missing=()
    for p in "${pkgs[@]}"; do [ -n "$(installed_version "$p")" ] || missing+=("$p"); done
    # The std must be the same version as the compiler.
    if [ ${#missing[@]} -eq 0 ] && [ "$(installed_version libstd-rust-web-dev:arm64)" = "$(installed_version rustc-web)" ]; then
        echo "Debian Rust toolchain for arm64 already installed ($(installed_version rustc-web))"
        return 0
    fi
    # A leftover armhf architecture (older versions of this script added it for
    # libstd-rust-web-dev:armhf) with a broken index would make the update below
    # fail; drop it unless some armhf package is installed.
    if dpkg --print-foreign-architectures | grep -qx armhf \
            && ! dpkg-query -W -f='${Architecture}\n' 2>/dev/null | grep -qx armhf; then
        dpkg --remove-architecture armhf 2>/dev/null || true
    fi
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt_update || { echo "FAIL: apt-get update (arm64) reported errors" >&2; return 1; }
    local rustc std
    rustc=$(candidate_version rustc-web)
    std=$(candidate_version libstd-rust-web-dev:arm64)
    echo "apt candidates: rustc-web $rustc, libstd-rust-web-dev:arm64 $std, qemu-user-static $(candidate_version qemu-user-static)"
    if [ -z "$rustc" ] || [ "$rustc" = "(none)" ] || [ "$rustc" != "$std" ]; then
        echo "FAIL: no libstd-rust-web-dev:arm64 matching rustc-web ($rustc vs $std)" >&2
        return 1
    fi
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
}

# armv7: Debian's std sources for the same rustc (rust-web-src, Architecture:
# all; /usr/lib/rustlib/src/rust), the armhf cross linker and libc. Mandatory.
# -Zbuild-std takes std's own dependencies (libc, hashbrown, ...) from
# crates.io at the versions in the sources' library/Cargo.lock.
setup_debian_rust_armv7() {
    local pkgs=(rust-web-src gcc-arm-linux-gnueabihf libc6-dev-armhf-cross binutils-arm-linux-gnueabihf
        qemu-user-static)
    local p missing=() want
    want=$(installed_version rustc-web)
    for p in "${pkgs[@]}"; do [ -n "$(installed_version "$p")" ] || missing+=("$p"); done
    if [ ${#missing[@]} -eq 0 ] && [ "$(installed_version rust-web-src)" = "$want" ]; then
        echo "Debian std sources and armhf cross toolchain already installed (rust-web-src $want)"
    else
        local src
        src=$(candidate_version rust-web-src)
        if [ "$src" != "$want" ]; then
            apt_update || echo "warning: apt-get update reported errors" >&2
            src=$(candidate_version rust-web-src)
        fi
        local extra=()
        if [ "$src" != "$want" ]; then
            # Debian has moved on since rustc-web was installed: upgrade the
            # compiler, the arm64 std and the sources together.
            if [ -n "$src" ] && [ "$src" = "$(candidate_version rustc-web)" ] \
                    && [ "$src" = "$(candidate_version libstd-rust-web-dev:arm64)" ]; then
                echo "upgrading Debian's Rust toolchain $want -> $src"
                extra=(rustc-web cargo-web libstd-rust-web-dev:arm64)
            else
                echo "FAIL: Debian offers rust-web-src ${src:-none}, but rustc-web is $want" >&2
                return 1
            fi
        fi
        apt-get install -y -q --no-install-recommends "${extra[@]}" "${pkgs[@]}" >/dev/null
    fi
    local lib
    lib=$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library
    [ -f "$lib/Cargo.lock" ] && [ -d "$lib/std" ] || { echo "FAIL: no std sources at $lib" >&2; return 1; }
}

# Whether a binary is statically linked: no program interpreter, no shared
# library needed.
is_static() {
    ! readelf -lW "$1" | grep -q INTERP && ! readelf -dW "$1" | grep -q NEEDED
}

# Highest GLIBC_x.y symbol version a binary needs.
glibc_floor() {
    local objdump=$1 bin=$2
    "$objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1
}
