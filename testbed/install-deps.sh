#!/usr/bin/env bash
# Installs the system packages cpuguard's build and test bed need (Debian 12, as root).
# Idempotent: installs only what is missing, and runs `apt-get update` only when something is
# missing and the package lists are absent or older than a day.
set -euo pipefail

PACKAGES=(
    qemu-system-x86         # the emulator the guests and the probe run in (TCG where KVM is unusable)
    qemu-system-arm binutils-aarch64-linux-gnu  # qemu-system-aarch64 for the ARM64 probe; GNU as cross-checks its encoder in tests
    libvirt-daemon-system   # libvirtd + virtlogd for the two test-bed hosts
    libvirt-clients         # virsh
    libvirt-dev             # libvirt headers/.pc for the `virt` crate
    pkg-config
    rsyslog                 # the real syslog daemon the audit lines are checked in
    cpuid                   # reference CPUID dumps
    chromium                # headless browser that renders `cpuguard plan --html` in tests/operator_plan.rs
    hyperfine               # benchmarks
    rpm                     # rpmbuild: the RPM is built and installed into a scratch root by tests/packaging_rpm.rs
    iproute2                # ss: is a syslog socket being listened on
    util-linux              # unshare, nsenter, flock, logger
    build-essential         # cc/ld for cargo builds
    ca-certificates
    curl
)

[[ $(id -u) -eq 0 ]] || { echo "install-deps: must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) != installed ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    lists=/var/lib/apt/lists
    if [[ -z $(find "$lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null) ]]; then
        apt-get update -q
    fi
    echo "install-deps: installing ${missing[*]}" >&2
    # policy-rc.d: package scripts must not start daemons on their own (no systemd here, and the
    # test bed starts its own libvirtd/rsyslogd); removed again afterwards unless it was there.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created_policy=1
    fi
    rc=0
    apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}" || rc=$?
    if ((created_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || { echo "install-deps: apt-get install failed ($rc)" >&2; exit "$rc"; }
else
    echo "install-deps: all ${#PACKAGES[@]} packages already installed" >&2
fi

# Rust toolchain: the build needs cargo; install rustup's stable toolchain only if cargo is absent.
if ! command -v cargo >/dev/null 2>&1 && [[ ! -x $HOME/.cargo/bin/cargo ]]; then
    echo "install-deps: installing the Rust toolchain (rustup, stable, minimal profile)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
fi
