# Sourced by scripts/cross-test and scripts/package: Debian's Rust toolchain
# (rustc-web/cargo-web, which ships std for arm64 and armhf as multiarch
# packages) and its cross linkers and qemu-user. The rustup toolchain has no
# foreign std and this machine cannot download one, so cross builds use
# /usr/bin/rustc and /usr/bin/cargo, in their own target dir so they never
# invalidate the native builds in target/.
#
# Environment:
#   PULSEBELL_CROSS_TARGET_DIR  cargo target dir for cross builds (default target/cross)

AARCH64=aarch64-unknown-linux-gnu
ARMV7=armv7-unknown-linux-gnueabihf
CROSS_TARGET_DIR=${PULSEBELL_CROSS_TARGET_DIR:-$PWD/target/cross}
# Written by the armhf step; read by scripts/package.
ARMV7_STATUS_FILE=$CROSS_TARGET_DIR/armv7.status

# cargo with Debian's rustc. qemu-user runs the foreign test binaries; no -L:
# libstd-rust-web-dev:ARCH pulls in the multiarch libc6:ARCH, whose loader
# (/lib/ld-linux-*.so) and libc come from the same package. Don't use
# `-L /usr/aarch64-linux-gnu`: that loader is libc6-arm64-cross's, which finds
# the multiarch libc.so.6 through /etc/ld.so.cache; when the two versions
# differ (2.36-8cross1 vs 2.36-9+deb12u14 here) the first pthread_create
# spins forever (every test binary hangs).
dcargo() {
    env RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR="$CROSS_TARGET_DIR" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static \
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER=qemu-arm-static \
        /usr/bin/cargo "$@"
}

installed_version() { { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }
candidate_version() { { apt-cache policy "$1" 2>/dev/null || true; } | awk '/Candidate:/ {print $2}'; }

# apt-get update; returns non-zero if any index failed (apt prints E: lines).
apt_update() {
    local log
    log=$(mktemp)
    if apt-get update -q >"$log" 2>&1 && ! grep -q '^E:' "$log"; then
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
    # A leftover armhf architecture with a broken index would make the update
    # below fail; drop it unless something of it is installed.
    if dpkg --print-foreign-architectures | grep -qx armhf && [ -z "$(installed_version libstd-rust-web-dev:armhf)" ]; then
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

# armhf std for the same rustc. Optional: on success writes "ok" to
# $ARMV7_STATUS_FILE, otherwise "SKIP: <reason>" (and removes the armhf
# architecture again so apt-get update stays clean).
setup_debian_rust_armhf() {
    mkdir -p "$CROSS_TARGET_DIR"
    local want have
    want=$(installed_version rustc-web)
    have=$(installed_version libstd-rust-web-dev:armhf)
    if [ -n "$have" ] && [ "$have" = "$want" ] && [ -n "$(installed_version gcc-arm-linux-gnueabihf)" ]; then
        echo ok >"$ARMV7_STATUS_FILE"
        return 0
    fi
    local added=0 reason=""
    if ! dpkg --print-foreign-architectures | grep -qx armhf; then
        dpkg --add-architecture armhf
        added=1
    fi
    if ! apt_update 2>"$CROSS_TARGET_DIR/armhf-apt.err"; then
        reason="apt-get update failed for armhf ($(grep -m1 '^E:' "$CROSS_TARGET_DIR/armhf-apt.err" | sed 's/^E: //; s/ Mirror sync.*//; s/  */ /g'))"
    fi
    local cand
    cand=$(candidate_version libstd-rust-web-dev:armhf)
    if [ -z "$reason" ] && [ "$cand" != "$want" ]; then
        reason="Debian offers libstd-rust-web-dev:armhf ${cand:-none}, but rustc-web is $want"
    elif [ -n "$reason" ] && [ "$cand" != "$want" ]; then
        reason="$reason; only libstd-rust-web-dev:armhf ${cand:-none} is offered, rustc-web is $want"
    elif [ -n "$reason" ]; then
        reason=""  # the index that failed did not matter: the right std is there
    fi
    if [ -z "$reason" ] && ! apt-get install -y -q --no-install-recommends libstd-rust-web-dev:armhf \
            gcc-arm-linux-gnueabihf libc6-dev-armhf-cross binutils-arm-linux-gnueabihf >/dev/null; then
        reason="apt-get install of libstd-rust-web-dev:armhf $want failed"
    fi
    if [ -z "$reason" ]; then
        echo ok >"$ARMV7_STATUS_FILE"
        return 0
    fi
    echo "SKIP: $reason" >"$ARMV7_STATUS_FILE"
    if [ "$added" = 1 ] && ! dpkg-query -W -f='${Architecture}\n' 2>/dev/null | grep -qx armhf; then
        dpkg --remove-architecture armhf
        apt_update || echo "warning: apt-get update still reports errors after removing armhf" >&2
    fi
    return 0
}

# Highest GLIBC_x.y symbol version a binary needs.
glibc_floor() {
    local objdump=$1 bin=$2
    "$objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1
}
