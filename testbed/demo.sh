#!/usr/bin/env bash
# The newcomer's demo: two libvirt hosts on this machine with cpuguard as their qemu hook, one live
# migration that cpuguard lets through, one it refuses, and the audit lines it wrote to syslog.
# As root (installs what it needs through testbed/install-deps.sh). KEEP=1 leaves the bed up afterwards (bed.sh down stops it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BED="$ROOT/testbed/bed.sh"
cd "$ROOT"
[[ $(id -u) -eq 0 ]] || { echo "demo: must run as root" >&2; exit 1; }
if [[ ${KEEP:-0} != 1 ]]; then trap '"$BED" down >/dev/null 2>&1 || true' EXIT INT TERM; fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The source's `started` hook stamps the guest's CPU fingerprint into its live metadata (through a
# detached helper); the destination refuses unstamped guests by default. The wait ends when the
# stamp is there or when the stamp process audited its failure (it gives up on its own after its
# bounded retries and probe timeout); the bound only catches a stamp process that died silently.
wait_stamp() {
    local name=$1 start=$SECONDS failed
    while ((SECONDS - start < 300)); do
        if [[ $("$BED" virsh-a dumpxml "$name" 2>/dev/null) == *cpuguard.dev/xmlns/stamp* ]]; then
            echo "stamped $name after $((SECONDS - start)) s"
            return 0
        fi
        failed=$(tail -c +"$((MARK + 1))" "$AUDIT" | grep -E "phase=(stamp|started) action=failed domain=$name " | tail -n 1 || true)
        if [[ -n $failed ]]; then
            echo "demo: stamping $name failed: $failed" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "demo: $name was not stamped within $((SECONDS - start)) s, and no failure was audited" >&2
    return 1
}

step "System packages"
"$ROOT/testbed/install-deps.sh"
if ! command -v cargo >/dev/null 2>&1; then export PATH="$HOME/.cargo/bin:$PATH"; fi

step "Building cpuguard"
# Every program the bed runs: cpuguard (hook and CLI) and cpuguard-libvirt (the stamp process the
# hook starts after a guest starts).
cargo build --release --bins
export CPUGUARD_BIN="$ROOT/target/release/cpuguard"

step "Bringing up host A and host B (two libvirtd in their own namespaces) and rsyslogd"
"$BED" up
"$BED" install-hook "$CPUGUARD_BIN"
AUDIT=$("$BED" audit-log)
ADDR_B=$("$BED" addr-b)
MARK=$(stat -c %s "$AUDIT")

GUEST=demo-guest
step "Defining and starting $GUEST on host A (TCG, 64 MiB, cpuguard's heartbeat firmware)"
"$BED" virsh-a destroy "$GUEST" >/dev/null 2>&1 || true
"$BED" virsh-a undefine "$GUEST" >/dev/null 2>&1 || true
"$BED" virsh-b destroy "$GUEST" >/dev/null 2>&1 || true
"$BED" virsh-b undefine "$GUEST" >/dev/null 2>&1 || true
"$BED" define-guest "$GUEST" >/dev/null
"$BED" virsh-a start "$GUEST"
SERIAL="$("$BED" state-dir)/guests/$GUEST.serial"
wait_stamp "$GUEST"
sleep 1
echo "serial on A: $(tail -n 1 "$SERIAL" | tr -d '\r')"

step "Live migration A -> B (cpuguard runs on B: migrate, prepare, start, started)"
time "$BED" virsh-a migrate --live --persistent --undefinesource "$GUEST" \
    "qemu+tcp://$ADDR_B:16510/system" --migrateuri "tcp://$ADDR_B:49152"
echo "host A:"; "$BED" virsh-a list --all
echo "host B:"; "$BED" virsh-b list --all
echo "B's live <cpu>:"; "$BED" virsh-b dumpxml "$GUEST" | sed -n '/<cpu /,/<\/cpu>/p'
sleep 2
echo "serial, now written by B's QEMU: $(tail -n 1 "$SERIAL" | tr -d '\r')"

step "A migration cpuguard refuses: host B's guests would lose SSE3 (pni)"
# B gets an emulator wrapper (inside B's namespace only) that adds ",-pni" to every -cpu: the kind
# of destination an older or differently configured hypervisor is.
"$BED" emulator-b set "-pni"
VETOED=demo-guest-2
for h in a b; do
    "$BED" virsh-$h destroy "$VETOED" >/dev/null 2>&1 || true
    "$BED" virsh-$h undefine "$VETOED" >/dev/null 2>&1 || true
done
"$BED" define-guest "$VETOED" >/dev/null
"$BED" virsh-a start "$VETOED"
wait_stamp "$VETOED"
if "$BED" virsh-a migrate --live --persistent --undefinesource "$VETOED" \
    "qemu+tcp://$ADDR_B:16510/system" --migrateuri "tcp://$ADDR_B:49152" 2>"$("$BED" state-dir)/demo-veto.err"; then
    echo "UNEXPECTED: the migration went through" >&2
    exit 1
else
    echo "virsh migrate failed, as it should; what it printed (libvirt's wrapper shortened):"
    sed 's/Child process ([^)]*)/Child process (hook)/' "$("$BED" state-dir)/demo-veto.err"
fi
echo "host A:"; "$BED" virsh-a list --all
echo "host B:"; "$BED" virsh-b list --all
"$BED" emulator-b reset

step "cpuguard's audit lines (syslog, tag cpuguard: $AUDIT)"
# rsyslogd writes asynchronously: wait for the refusal's line (the last decision of the demo).
for _ in $(seq 1 300); do
    tail -c +"$((MARK + 1))" "$AUDIT" | grep -qE "phase=prepare action=refused domain=$VETOED " && break
    sleep 0.2
done
if ! tail -c +"$((MARK + 1))" "$AUDIT" | grep -E "domain=($GUEST|$VETOED) "; then
    echo "demo: no audit line of $GUEST or $VETOED reached syslog" >&2
    exit 1
fi
tail -c +"$((MARK + 1))" "$AUDIT" | grep -qE "phase=prepare action=refused domain=$VETOED " ||
    { echo "demo: the refusal of $VETOED is not in the audit trail" >&2; exit 1; }
