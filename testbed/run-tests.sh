#!/usr/bin/env bash
# THE test command (README): on a fresh Debian 12 machine, as root, installs what the build and
# the test bed need, builds everything in release mode and runs the whole suite (unit tests,
# integration tests, the two-host libvirt bed). Fails on any failure; the bed is always taken down.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

[[ $(id -u) -eq 0 ]] || { echo "run-tests: must run as root (installs packages, starts libvirtd)" >&2; exit 1; }

cleanup() {
    "$ROOT/testbed/bed.sh" down || true
    "$ROOT/testbed/bed.sh" syslog-down || true
}
trap cleanup EXIT INT TERM

"$ROOT/testbed/install-deps.sh"
if ! command -v cargo >/dev/null 2>&1; then export PATH="$HOME/.cargo/bin:$PATH"; fi

# The Linux guest tests/fidelity_linux.rs boots (apt-get download, cached; does nothing when current).
if [[ -x $ROOT/testbed/fetch-linux-guest.sh ]]; then "$ROOT/testbed/fetch-linux-guest.sh"; fi
# The arm64 Linux guest tests/fidelity_arm.rs boots (same: apt-get download, cached).
if [[ -x $ROOT/testbed/fetch-linux-guest-arm64.sh ]]; then "$ROOT/testbed/fetch-linux-guest-arm64.sh"; fi

# A bed left over from an interrupted run would hold ports and guests.
"$ROOT/testbed/bed.sh" down || true

# A real syslog daemon for the whole suite (the hook's tests check what reaches /dev/log); the
# bed's tests bring their libvirt hosts up and down around it.
"$ROOT/testbed/bed.sh" syslog-up

# The project's standards are part of the suite: formatting, the lints (Cargo.toml [lints] and the
# shipped crates' no-unwrap/expect/panic headers) and API docs that warn about nothing.
if command -v rustup >/dev/null 2>&1; then rustup component add clippy rustfmt >/dev/null 2>&1 || true; fi
cargo fmt --check
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

cargo build --release --all-targets
# This script installed every prerequisite above, so a test finding one missing is a failure, not
# a skip (tests/support/gate.rs): only what no script can provide (a usable KVM) is still skipped.
export CI=true
# --no-fail-fast: every test binary runs and every failure is listed; the exit status is still
# non-zero on any failure.
cargo test --release --no-fail-fast
