#!/usr/bin/env bash
# cpuguard test bed: two libvirt "hosts" on one machine, a real syslog daemon, real live migration.
#
# Each host (a, b) runs its own virtlogd + libvirtd in a private mount and UTS namespace, with
# private copies of /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt, /run/libvirt
# and of cpuguard's own /etc/cpuguard, /var/cache/cpuguard, /run/cpuguard. Host A is namespaced too
# (not the machine's ordinary daemon) so that the bed never touches the machine's libvirt state and
# never collides with a libvirtd the machine already runs.
#
#   host A: hostname cpuguard-bed-a, qemu+tcp://127.0.N.1:16510/system, migration port 49153
#   host B: hostname cpuguard-bed-b, qemu+tcp://127.0.N.2:16510/system, migration port 49152
#
# Several beds run side by side (one per engineer or work tree): CPUGUARD_BED_ID=N (0-99, default
# 0) gives bed N its own state directory (/var/tmp/cpuguard-testbed, or -N after it), its own
# loopback addresses 127.0.N.1 and 127.0.N.2 (so its own libvirtd and migration ports) and, when
# another bed's rsyslogd already serves /dev/log, its own rsyslogd on a private socket.
#
# Subcommands: up | down | status | install-hook PATH | uninstall-hook | restart [a|b]
#              syslog-up | syslog-down (the bed's rsyslogd alone, kept across up/down)
#              virsh-a ARGS... | virsh-b ARGS... | uri-a | uri-b | exec-a CMD... | exec-b CMD...
#              define-guest NAME [CPU-XML-FILE] [--arch x86_64|aarch64] [--virt-type qemu|kvm]
#              emulator-b set CPU-OPTIONS [--arch x86_64|aarch64] | emulator-b reset
#              firmware-path [--arch A] | firmware-kind [--arch A] | audit-log | state-dir
#              addr-a | addr-b
set -euo pipefail

BED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BED_ID="${CPUGUARD_BED_ID:-0}"
if ! [[ $BED_ID =~ ^[0-9]{1,2}$ ]]; then
    printf 'bed: error: CPUGUARD_BED_ID must be 0-99, got %s\n' "$BED_ID" >&2
    exit 2
fi
BED_ID=$((10#$BED_ID))
if ((BED_ID == 0)); then DEFAULT_STATE=/var/tmp/cpuguard-testbed; else DEFAULT_STATE=/var/tmp/cpuguard-testbed-$BED_ID; fi
STATE="${CPUGUARD_TESTBED_DIR:-$DEFAULT_STATE}"
SYSLOG_DIR="$STATE/syslog"
AUDIT_LOG="$SYSLOG_DIR/cpuguard.log"
ALL_LOG="$SYSLOG_DIR/all.log"
FIRMWARE="$STATE/images/heartbeat.bin"
FIRMWARE_AARCH64="$STATE/images/heartbeat-aarch64.bin"
# The guest architectures the bed runs, and each one's emulator.
ARCHES=(x86_64 aarch64)
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# Mount points each host namespace needs: cpuguard's own directories and /run/libvirt. The bed
# creates the missing ones (empty) and removes them again at `down`.
MOUNT_POINTS=(/etc/cpuguard /var/cache/cpuguard /run/cpuguard /run/libvirt)

log() { printf 'bed: %s\n' "$*" >&2; }
die() { printf 'bed: error: %s\n' "$*" >&2; exit 1; }

host_addr() { case "$1" in a) echo "127.0.$BED_ID.1" ;; b) echo "127.0.$BED_ID.2" ;; *) die "unknown host '$1'" ;; esac; }
host_uuid() { case "$1" in a) echo 6a1f3c2e-0b7d-4e58-9c11-a0a0a0a0a00a ;; b) echo 6b2e4d3f-1c8e-4f69-8d22-b0b0b0b0b00b ;; esac; }
host_uri() { echo "qemu+unix:///system?socket=$STATE/$1/run/libvirt-sock"; }

# --- processes -------------------------------------------------------------------------------------

# proc_alive PID COMM: PID runs the program COMM (guards against a recycled pid after a crash).
proc_alive() {
    local pid=$1 comm=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
    # A killed daemon stays a zombie until its parent (often pid 1) reaps it.
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# pid_alive PIDFILE COMM. The daemon may delete its pid file while exiting: read it once.
pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    proc_alive "$pid" "$2"
}

# stop_pidfile PIDFILE COMM: TERM, then KILL after 10 s, only the process named in PIDFILE.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    pid=$(cat "$pidfile" 2>/dev/null) || pid=
    if proc_alive "$pid" "$comm"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            proc_alive "$pid" "$comm" || break
            sleep 0.1
        done
        if proc_alive "$pid" "$comm"; then
            log "$comm ($pid) ignored SIGTERM, killing"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$pidfile"
}

# wait_ready WHAT BOUND ALIVE-CMD -- READY-CMD...: polls READY-CMD until it succeeds, and gives up
# at once when ALIVE-CMD fails (what is being waited for is gone: no amount of waiting helps). The
# wait is derived from what it waits for, not from a guess about this machine's speed: BOUND (in
# seconds of wall time) only ends a wait on something that neither gets ready nor dies, and is
# generous on purpose (a libvirtd with a cold capabilities cache probes every QEMU binary for about
# a minute before it answers, longer on a loaded machine). A slow step is reported with its time.
wait_ready() {
    local what=$1 bound=$2 alive=$3 start now elapsed
    shift 4
    start=$EPOCHREALTIME
    while :; do
        if "$@" >/dev/null 2>&1; then break; fi
        if ! $alive >/dev/null; then
            die "$what: the process exited while it was being waited for"
        fi
        now=$EPOCHREALTIME
        elapsed=$(((${now/./} - ${start/./}) / 1000000))
        ((elapsed < bound)) || die "$what: not ready after ${elapsed}s (bound ${bound}s; the process is still running)"
        sleep 0.1
    done
    now=$EPOCHREALTIME
    elapsed=$(((${now/./} - ${start/./}) / 1000))
    if ((elapsed >= 3000)); then
        log "$what: ready after $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000)))s"
    fi
}

# Bounds for wait_ready: last resorts, see above.
READY_BOUND_DAEMON=120   # rsyslogd, virtlogd: they start in milliseconds
READY_BOUND_LIBVIRTD=900 # libvirtd: QEMU capability probing on a cold cache, under load

# alive_or_starting PIDFILE COMM: the daemon named in PIDFILE runs, or has not written it yet.
alive_or_starting() {
    [[ ! -s $1 ]] || pid_alive "$1" "$2"
}

# --- syslog ----------------------------------------------------------------------------------------

# Our rsyslogd serves /dev/log itself when the machine has no syslog ("devlog" mode). When the
# machine already has one, ours listens on a private socket that each host namespace bind-mounts
# over /dev/log ("private" mode), so the hook still logs to /dev/log and the machine's syslog is left
# alone.
syslog_socket() {
    if [[ $(cat "$SYSLOG_DIR/mode" 2>/dev/null) == devlog ]]; then echo /dev/log; else echo "$SYSLOG_DIR/log.sock"; fi
}

socket_listening() { ss -xl 2>/dev/null | grep -qF " $1 "; }

syslog_up() {
    mkdir -p "$SYSLOG_DIR/work"
    if pid_alive "$SYSLOG_DIR/rsyslogd.pid" rsyslogd && socket_listening "$(syslog_socket)"; then
        return 0
    fi
    stop_pidfile "$SYSLOG_DIR/rsyslogd.pid" rsyslogd
    local mode sock
    # Bed 0 takes /dev/log when nobody serves it; any other bed never does while /dev/log exists
    # (bed 0's rsyslogd may be restarting at that very moment: taking its socket would steal its
    # lines), and binds its own socket over /dev/log inside its hosts' namespaces instead.
    if [[ -e /dev/log || -L /dev/log ]] &&
        { ((BED_ID != 0)) || socket_listening "$(readlink -f /dev/log)"; }; then
        mode=private
        sock="$SYSLOG_DIR/log.sock"
    else
        # A /dev/log nobody listens on is left over from a crashed syslog daemon.
        [[ -S /dev/log ]] && rm -f /dev/log
        mode=devlog
        sock=/dev/log
    fi
    rm -f "$SYSLOG_DIR/log.sock"
    echo "$mode" >"$SYSLOG_DIR/mode"
    touch "$AUDIT_LOG" "$ALL_LOG"
    cat >"$SYSLOG_DIR/rsyslog.conf" <<EOF
# Written by testbed/bed.sh: cpuguard's audit lines in their own file, everything in all.log.
global(workDirectory="$SYSLOG_DIR/work" processInternalMessages="on")
module(load="imuxsock" SysSock.Name="$sock" SysSock.RateLimit.Interval="0")
:programname, isequal, "cpuguard" action(type="omfile" file="$AUDIT_LOG" template="RSYSLOG_FileFormat")
*.* action(type="omfile" file="$ALL_LOG" template="RSYSLOG_FileFormat")
EOF
    rsyslogd -f "$SYSLOG_DIR/rsyslog.conf" -i "$SYSLOG_DIR/rsyslogd.pid" 9>&-
    wait_ready "rsyslogd listening on $sock" "$READY_BOUND_DAEMON" \
        "alive_or_starting $SYSLOG_DIR/rsyslogd.pid rsyslogd" -- socket_listening "$sock"
    log "rsyslogd up ($mode mode, socket $sock, audit file $AUDIT_LOG)"
}

syslog_down() {
    local mode
    mode=$(cat "$SYSLOG_DIR/mode" 2>/dev/null || true)
    stop_pidfile "$SYSLOG_DIR/rsyslogd.pid" rsyslogd
    # rsyslogd leaves its socket behind; /dev/log is removed only if it was ours.
    if [[ $mode == devlog && -S /dev/log ]] && ! socket_listening /dev/log; then rm -f /dev/log; fi
    rm -f "$SYSLOG_DIR/log.sock"
}

# --- hosts -----------------------------------------------------------------------------------------

host_dir() { echo "$STATE/$1"; }

prepare_host_tree() {
    local h=$1 d
    d=$(host_dir "$h")
    rm -rf "$d"
    mkdir -p "$d"/{etc,lib,cache,log,run,cpuguard-etc,cpuguard-cache,cpuguard-run}
    # cpuguard's cache and runtime directories as the packages make them (root-only): a wider mode
    # is what cpuguard narrows and audits, which is not what the bed is showing.
    chmod 0700 "$d/cpuguard-cache" "$d/cpuguard-run"
    # The machine's libvirt configuration, without anything that would act on the machine or that
    # the bed must not inherit: defined guests (and their autostart), networks' autostart, storage
    # pools (an autostarted pool may be real storage), secrets, hooks.
    cp -a /etc/libvirt/. "$d/etc/"
    rm -rf "$d/etc/qemu/"*.xml "$d/etc/qemu/autostart" "$d/etc/qemu/networks/autostart/"* \
        "$d/etc/storage" "$d/etc/secrets" "$d/etc/hooks"
    # /var/lib/libvirt may hold disk images: only its directory tree.
    (cd /var/lib/libvirt && find . -type d -print0) | (cd "$d/lib" && xargs -0 -r mkdir -p)
    # libvirtd probes each QEMU binary's capabilities at start (seconds) unless its cache is valid;
    # the first host's cache is valid for the second and for later runs (libvirt revalidates it
    # against the binaries' timestamps, the kernel and the host CPU, and re-probes if stale).
    if [[ -d $STATE/qemu-caps-cache ]]; then
        mkdir -p "$d/cache/qemu/capabilities"
        cp -a "$STATE/qemu-caps-cache/." "$d/cache/qemu/capabilities/"
    fi
    mkdir -p "$d/log/qemu" "$d/etc/hooks" "$d/etc/qemu/networks/autostart"
    cat >>"$d/etc/libvirtd.conf" <<EOF

# --- cpuguard test bed, host $h ---
host_uuid = "$(host_uuid "$h")"
listen_tls = 0
listen_tcp = 1
listen_addr = "$(host_addr "$h")"
tcp_port = "16510"
auth_tcp = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
    cat >>"$d/etc/qemu.conf" <<EOF

# --- cpuguard test bed, host $h ---
# Both hosts share this machine's cgroup tree: a guest migrating between them would exist twice
# under the same cgroup name, which real separate hosts never do.
cgroup_controllers = [ ]
# Guests read the firmware and write serial files under $STATE.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
EOF
}

# Runs inside the fresh namespace of host $1 (started through unshare by host_up).
ns_init() {
    local h=$1 d sock
    d=$(host_dir "$h")
    hostname "cpuguard-bed-$h"
    mount --bind "$d/etc" /etc/libvirt
    mount --bind "$d/lib" /var/lib/libvirt
    mount --bind "$d/cache" /var/cache/libvirt
    mount --bind "$d/log" /var/log/libvirt
    mount --bind "$d/run" /run/libvirt
    mount --bind "$d/cpuguard-etc" /etc/cpuguard
    mount --bind "$d/cpuguard-cache" /var/cache/cpuguard
    mount --bind "$d/cpuguard-run" /run/cpuguard
    sock=$(syslog_socket)
    if [[ $sock != /dev/log ]]; then mount --bind "$sock" /dev/log; fi
    virtlogd -d -p "$d/virtlogd.pid"
}

ns_pid() { cat "$(host_dir "$1")/virtlogd.pid"; }

in_ns() { # in_ns HOST CMD...: run CMD in the host's namespaces (kept alive by its virtlogd)
    local h=$1
    shift
    pid_alive "$(host_dir "$h")/virtlogd.pid" virtlogd || die "host $h is not up"
    nsenter -t "$(ns_pid "$h")" -m -u -- "$@"
}

virsh_ok() { virsh -q -c "$(host_uri "$1")" list --all; }

start_libvirtd() {
    local h=$1 d
    d=$(host_dir "$h")
    in_ns "$h" libvirtd --listen -d -p "$d/libvirtd.pid" 9>&-
    libvirtd_alive() { pid_alive "$d/libvirtd.pid" libvirtd || { tail -n 5 "$d/log/libvirtd.log" >&2; false; }; }
    # `libvirtd -d` may return before the daemon wrote its pid file.
    wait_ready "libvirtd of host $h writing $d/libvirtd.pid" "$READY_BOUND_DAEMON" true -- \
        pid_alive "$d/libvirtd.pid" libvirtd
    wait_ready "libvirtd of host $h (log: $d/log/libvirtd.log)" "$READY_BOUND_LIBVIRTD" \
        libvirtd_alive -- virsh_ok "$h"
}

host_up() {
    local h=$1 d
    d=$(host_dir "$h")
    prepare_host_tree "$h"
    unshare -m -u --propagation private -- "$BED_DIR/bed.sh" _ns-init "$h" 9>&-
    # virtlogd -d has written its pid file when unshare returns: the wait is for the namespace's
    # process to be visible.
    wait_ready "virtlogd of host $h" "$READY_BOUND_DAEMON" true -- pid_alive "$d/virtlogd.pid" virtlogd
    start_libvirtd "$h"
    save_caps_cache "$h"
    log "host $h up: $(host_uri "$h")"
}

# Keeps host H's QEMU capabilities cache for the next `up`. libvirt 9 fills it when it first needs
# an emulator (a define, a start, domcapabilities), not when the daemon starts, so it is kept at
# `down` too (from host A only: B's emulator may be emulator-b's wrapper, whose capabilities are
# not the machine's; libvirt would re-probe them anyway, as it re-probes any stale entry).
save_caps_cache() {
    local d
    d=$(host_dir "$1")
    compgen -G "$d/cache/qemu/capabilities/*.xml" >/dev/null || return 0
    mkdir -p "$STATE/qemu-caps-cache"
    cp -a "$d/cache/qemu/capabilities/." "$STATE/qemu-caps-cache/"
}

# Guests are QEMU processes the bed started through libvirt: destroy them through libvirt, then kill
# any left by pid file (e.g. after libvirtd crashed).
host_guests_down() {
    local h=$1 d name pidfile
    d=$(host_dir "$h")
    if pid_alive "$d/libvirtd.pid" libvirtd; then
        while read -r name; do
            [[ -n $name ]] && virsh -q -c "$(host_uri "$h")" destroy "$name" >/dev/null 2>&1 || true
        done < <(virsh -q -c "$(host_uri "$h")" list --name 2>/dev/null || true)
    fi
    for pidfile in "$d"/run/qemu/*.pid; do
        [[ -e $pidfile ]] || continue
        stop_pidfile "$pidfile" qemu-system
    done
}

host_down() {
    local h=$1 d
    d=$(host_dir "$h")
    [[ -d $d ]] || return 0
    host_guests_down "$h"
    stop_pidfile "$d/libvirtd.pid" libvirtd
    stop_pidfile "$d/virtlogd.pid" virtlogd
    # The namespace, and with it every bind mount, ends with its last process.
}

host_healthy() {
    local d
    d=$(host_dir "$1")
    pid_alive "$d/virtlogd.pid" virtlogd && pid_alive "$d/libvirtd.pid" libvirtd && virsh_ok "$1" >/dev/null 2>&1
}

# --- architectures ---------------------------------------------------------------------------------

check_arch() { case "$1" in x86_64 | aarch64) ;; *) die "unknown guest architecture '$1' (x86_64 or aarch64)" ;; esac; }
arch_emulator() { echo "/usr/bin/qemu-system-$1"; }
arch_firmware() { if [[ $1 == aarch64 ]]; then echo "$FIRMWARE_AARCH64"; else echo "$FIRMWARE"; fi; }
arch_template() { if [[ $1 == aarch64 ]]; then echo "$BED_DIR/guest-aarch64.xml.in"; else echo "$BED_DIR/guest.xml.in"; fi; }

# --- firmware --------------------------------------------------------------------------------------

# The heartbeat firmware (prints `heartbeat NNNNNN` on COM1 forever) written by the cpuguard binary
# ($CPUGUARD_BIN, else target/debug/cpuguard); without one, a 64 KiB image of 'hlt' (0xF4): the CPU
# halts at the reset vector and, if ever woken, wraps around onto another hlt.
make_firmware() {
    mkdir -p "$(dirname "$FIRMWARE")"
    local cpuguard="${CPUGUARD_BIN:-$BED_DIR/../target/debug/cpuguard}"
    if [[ -x $cpuguard ]] && "$cpuguard" firmware heartbeat "$FIRMWARE.new" >/dev/null 2>&1; then
        mv "$FIRMWARE.new" "$FIRMWARE"
        echo heartbeat >"$FIRMWARE.kind"
    else
        rm -f "$FIRMWARE.new"
        head -c 65536 /dev/zero | tr '\0' '\364' >"$FIRMWARE"
        echo hlt >"$FIRMWARE.kind"
        log "no heartbeat firmware from $cpuguard: guests run a halting placeholder"
    fi
    # The aarch64 guest (QEMU virt, -bios: entered at flash offset 0 at EL1). Its placeholder is
    # `wfi; b .-4` (little-endian words d503207f, 17ffffff).
    if [[ -x $cpuguard ]] && "$cpuguard" firmware heartbeat-aarch64 "$FIRMWARE_AARCH64.new" >/dev/null 2>&1; then
        mv "$FIRMWARE_AARCH64.new" "$FIRMWARE_AARCH64"
        echo heartbeat >"$FIRMWARE_AARCH64.kind"
    else
        rm -f "$FIRMWARE_AARCH64.new"
        printf '\x7f\x20\x03\xd5\xff\xff\xff\x17' >"$FIRMWARE_AARCH64"
        echo wfi >"$FIRMWARE_AARCH64.kind"
        log "no aarch64 heartbeat firmware from $cpuguard: aarch64 guests run a halting placeholder"
    fi
}

# --- subcommands -----------------------------------------------------------------------------------

require_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (starts libvirtd, mounts)"; }

cmd_up() {
    require_root
    for tool in libvirtd virtlogd virsh rsyslogd qemu-system-x86_64 qemu-system-aarch64 unshare nsenter ss; do
        command -v "$tool" >/dev/null || die "$tool not found: run testbed/install-deps.sh"
    done
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another bed.sh is running (lock $STATE/.lock held for 300 s)"
    syslog_up
    if host_healthy a && host_healthy b; then
        log "already up"
        return 0
    fi
    # Anything half-up is left over from a crashed run: start both hosts from scratch.
    host_down a
    host_down b
    local dir
    : >"$STATE/created-dirs.new"
    for dir in "${MOUNT_POINTS[@]}"; do
        if [[ ! -d $dir ]]; then
            mkdir -p "$dir"
            echo "$dir" >>"$STATE/created-dirs.new"
        fi
    done
    cat "$STATE/created-dirs.new" >>"$STATE/created-dirs"
    rm -f "$STATE/created-dirs.new"
    make_firmware
    mkdir -p "$STATE/guests"
    host_up a
    host_up b
}

cmd_down() {
    require_root
    [[ -d $STATE ]] || return 0
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another bed.sh is running (lock $STATE/.lock held for 300 s)"
    host_down b
    host_down a
    save_caps_cache a
    # A syslog pinned by `syslog-up` outlives the bed (the test command keeps one for the suite).
    if [[ ! -e $SYSLOG_DIR/pinned ]]; then syslog_down; fi
    local dir
    if [[ -f $STATE/created-dirs ]] && other_bed_up; then
        log "another bed is up: the mount points stay (its namespaces use them)"
    elif [[ -f $STATE/created-dirs ]]; then
        # Only the empty mount points the bed created itself.
        while read -r dir; do
            [[ -n $dir ]] && rmdir "$dir" 2>/dev/null || true
        done <"$STATE/created-dirs"
        rm -f "$STATE/created-dirs"
    fi
    log "down"
}

# Whether a bed with another state directory (/var/tmp/cpuguard-testbed*) has a host up.
other_bed_up() {
    local dir h
    for dir in /var/tmp/cpuguard-testbed /var/tmp/cpuguard-testbed-*; do
        [[ -d $dir && $dir != "$STATE" ]] || continue
        for h in a b; do
            pid_alive "$dir/$h/virtlogd.pid" virtlogd && return 0
        done
    done
    return 1
}

# syslog-up / syslog-down: the bed's rsyslogd alone, kept running across `up`/`down` until
# `syslog-down` (the test command provides a real syslog to the whole suite this way).
cmd_syslog_up() {
    require_root
    mkdir -p "$SYSLOG_DIR"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another bed.sh is running (lock $STATE/.lock held for 300 s)"
    syslog_up
    touch "$SYSLOG_DIR/pinned"
}

cmd_syslog_down() {
    require_root
    [[ -d $STATE ]] || return 0
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another bed.sh is running (lock $STATE/.lock held for 300 s)"
    rm -f "$SYSLOG_DIR/pinned"
    if host_healthy a || host_healthy b; then
        log "bed is up: rsyslogd stays until bed.sh down"
        return 0
    fi
    syslog_down
}

cmd_status() {
    local h d rc=0
    for h in a b; do
        d=$(host_dir "$h")
        if host_healthy "$h"; then
            echo "host $h: up (libvirtd $(cat "$d/libvirtd.pid"), virtlogd $(cat "$d/virtlogd.pid")) $(host_uri "$h")"
            virsh -q -c "$(host_uri "$h")" list --all | sed 's/^/    /'
            [[ -x $d/etc/hooks/qemu ]] && echo "    hook: $(readlink -f "$d/etc/hooks/qemu")" || echo "    hook: none"
        else
            echo "host $h: down"
            rc=1
        fi
    done
    if pid_alive "$SYSLOG_DIR/rsyslogd.pid" rsyslogd; then
        echo "syslog: up ($(cat "$SYSLOG_DIR/mode") mode), audit lines in $AUDIT_LOG"
    else
        echo "syslog: down"
        rc=1
    fi
    return $rc
}

restart_hosts() {
    local h
    for h in "$@"; do
        host_healthy "$h" || die "host $h is not up (run: bed.sh up)"
        stop_pidfile "$(host_dir "$h")/libvirtd.pid" libvirtd
        start_libvirtd "$h"
    done
}

cmd_install_hook() {
    require_root
    local src=${1:-}
    [[ -n $src && -f $src && -x $src ]] || die "install-hook needs an executable file, got '${src}'"
    # A symlink, as cpuguard is installed (hooks/qemu -> /usr/bin/cpuguard): the hook then finds
    # what lives beside the real binary (its cpuguard-libvirt helper).
    local h target
    target=$(readlink -f "$src")
    for h in a b; do
        ln -sfn "$target" "$(host_dir "$h")/etc/hooks/qemu.new"
        mv -f -T "$(host_dir "$h")/etc/hooks/qemu.new" "$(host_dir "$h")/etc/hooks/qemu"
    done
    # libvirt looks for hook scripts only when the daemon starts.
    restart_hosts a b
    log "hook installed on both hosts: $src"
}

cmd_uninstall_hook() {
    require_root
    local h
    for h in a b; do rm -f "$(host_dir "$h")/etc/hooks/qemu"; done
    restart_hosts a b
    log "hook removed from both hosts"
}

# define-guest NAME [CPU-XML-FILE] [--arch x86_64|aarch64] [--virt-type qemu|kvm]: define (not
# start) a guest on host A from guest.xml.in (x86_64, the default) or guest-aarch64.xml.in (QEMU
# virt under TCG). --virt-type kvm makes it a <domain type='kvm'> (x86_64 only): the same firmware
# guest under the machine's KVM, where what it sees is QEMU's model filtered by KVM.
cmd_define_guest() {
    local name='' cpu_file='' arch=x86_64 virt_type=qemu cpu xml firmware
    while (($#)); do
        case "$1" in
            --virt-type)
                [[ $# -ge 2 ]] || die "define-guest: --virt-type needs qemu or kvm"
                case "$2" in qemu | kvm) virt_type=$2 ;; *) die "define-guest: unknown --virt-type '$2' (qemu or kvm)" ;; esac
                shift 2
                ;;
            --arch)
                [[ $# -ge 2 ]] || die "define-guest: --arch needs x86_64 or aarch64"
                arch=$2
                shift 2
                ;;
            *)
                if [[ -z $name ]]; then name=$1; elif [[ -z $cpu_file ]]; then cpu_file=$1; else die "define-guest: unexpected argument '$1'"; fi
                shift
                ;;
        esac
    done
    check_arch "$arch"
    [[ $virt_type == qemu || $arch == x86_64 ]] || die "define-guest: --virt-type kvm is for x86_64 guests only"
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "define-guest needs a NAME of [A-Za-z0-9_.-], got '$name'"
    if [[ -n $cpu_file ]]; then
        cpu=$(<"$cpu_file") || die "cannot read CPU XML file $cpu_file"
    elif [[ $arch == aarch64 ]]; then
        # libvirt 9.0 makes check='none' of it for an aarch64 TCG guest (check='partial' fails to
        # start: "unknown host CPU"); without any <cpu> QEMU's virt machine would be a cortex-a15.
        cpu="<cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>"
    else
        cpu="<cpu mode='custom' match='exact' check='partial'><model fallback='allow'>qemu64</model></cpu>"
    fi
    firmware=$(arch_firmware "$arch")
    [[ -f $firmware ]] || make_firmware
    mkdir -p "$STATE/guests"
    : >"$STATE/guests/$name.serial"
    xml=$(NAME=$name FIRMWARE=$firmware SERIAL="$STATE/guests/$name.serial" CPU=$cpu DOMAIN="<domain type='$virt_type'>" \
        awk '{ gsub(/@NAME@/, ENVIRON["NAME"]); gsub(/@FIRMWARE@/, ENVIRON["FIRMWARE"]);
               gsub(/@SERIAL@/, ENVIRON["SERIAL"]); sub(/^<domain type=.qemu.>/, ENVIRON["DOMAIN"]);
               if ($0 ~ /@CPU@/) { print ENVIRON["CPU"]; next } print }' "$(arch_template "$arch")")
    printf '%s\n' "$xml" >"$STATE/guests/$name.xml"
    virsh -q -c "$(host_uri a)" define "$STATE/guests/$name.xml" >/dev/null
    echo "$STATE/guests/$name.xml"
}

# emulator-b set CPU-OPTIONS [--arch x86_64|aarch64] | emulator-b reset
# Makes host B a machine whose guests see a different CPU: inside B's namespace only, a wrapper is
# bind-mounted over the emulator path that appends ",CPU-OPTIONS" (e.g. "-pni" or
# "model-id=Other CPU" for x86, "pmu=off" or "sve=off" for aarch64) to every `-cpu` argument.
# Without --arch both emulators are wrapped with the same options (the options only matter to the
# guests of the architecture they make sense for). libvirt, and cpuguard's probe on B, run the
# wrapper through the domain's unchanged <emulator> path. The real binary stays reachable for the
# wrapper at a second bind mount.
cmd_emulator_b() {
    require_root
    local action=${1:-} options='' arch='' d a emulator tag
    d=$(host_dir b)
    host_healthy b || die "host b is not up (run: bed.sh up)"
    [[ $# -gt 0 ]] && shift
    while (($#)); do
        case "$1" in
            --arch)
                [[ $# -ge 2 ]] || die "emulator-b: --arch needs x86_64 or aarch64"
                check_arch "$2"
                arch=$2
                shift 2
                ;;
            *)
                [[ -z $options ]] || die "emulator-b: unexpected argument '$1'"
                options=$1
                shift
                ;;
        esac
    done
    for a in "${ARCHES[@]}"; do
        emulator=$(arch_emulator "$a")
        tag=$(basename "$emulator")
        in_ns b umount "$emulator" 2>/dev/null || true
        in_ns b umount "$d/qemu-real-$tag" 2>/dev/null || true
    done
    rm -f "$d"/emulator-cpu-options*
    case "$action" in
        reset)
            log "host b runs the machine's emulators again"
            ;;
        set)
            [[ -n $options ]] || die "emulator-b set needs CPU-OPTIONS, e.g. -pni, 'model-id=Other CPU' or pmu=off"
            for a in "${ARCHES[@]}"; do
                [[ -z $arch || $arch == "$a" ]] || continue
                emulator=$(arch_emulator "$a")
                tag=$(basename "$emulator")
                if [[ ! -x $emulator ]]; then
                    [[ -z $arch ]] || die "$emulator not found: run testbed/install-deps.sh"
                    continue
                fi
                printf '%s\n' "$options" >"$d/emulator-cpu-options-$tag"
                : >"$d/qemu-real-$tag"
                cat >"$d/qemu-wrapper-$tag" <<WRAPPER
#!/bin/bash
# Written by testbed/bed.sh emulator-b: host B's guests get extra -cpu options.
options=\$(<"$d/emulator-cpu-options-$tag")
args=()
while ((\$#)); do
    if [[ \$1 == -cpu && \$# -ge 2 ]]; then
        args+=(-cpu "\$2,\$options")
        shift 2
        continue
    fi
    args+=("\$1")
    shift
done
# QEMU finds its modules and ROMs relative to its own executable, which is now elsewhere.
export QEMU_MODULE_DIR=$(dirname "$(dirname "$emulator")")/lib/x86_64-linux-gnu/qemu
exec -a "$emulator" "$d/qemu-real-$tag" -L $(dirname "$(dirname "$emulator")")/share/qemu "\${args[@]}"
WRAPPER
                chmod 0755 "$d/qemu-wrapper-$tag"
                in_ns b mount --bind "$emulator" "$d/qemu-real-$tag"
                in_ns b mount --bind "$d/qemu-wrapper-$tag" "$emulator"
                log "host b: every -cpu of $tag gets ,$options"
            done
            ;;
        *) die "usage: bed.sh emulator-b set CPU-OPTIONS [--arch x86_64|aarch64] | emulator-b reset" ;;
    esac
}

# firmware-path [--arch x86_64|aarch64]: the heartbeat image guests of that architecture boot.
cmd_firmware_path() {
    local arch=x86_64
    if [[ ${1:-} == --arch ]]; then
        [[ $# -ge 2 ]] || die "firmware-path: --arch needs x86_64 or aarch64"
        arch=$2
    fi
    check_arch "$arch"
    arch_firmware "$arch"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        syslog-up) cmd_syslog_up ;;
        syslog-down) cmd_syslog_down ;;
        install-hook) cmd_install_hook "$@" ;;
        uninstall-hook) cmd_uninstall_hook ;;
        restart)
            require_root
            if [[ $# -eq 0 ]]; then set -- a b; fi
            restart_hosts "$@"
            ;;
        virsh-a) exec virsh -c "$(host_uri a)" "$@" ;;
        virsh-b) exec virsh -c "$(host_uri b)" "$@" ;;
        addr-a) host_addr a ;;
        addr-b) host_addr b ;;
        uri-a) host_uri a ;;
        uri-b) host_uri b ;;
        exec-a) in_ns a "$@" ;;
        exec-b) in_ns b "$@" ;;
        define-guest) cmd_define_guest "$@" ;;
        emulator-b) cmd_emulator_b "$@" ;;
        firmware-path) cmd_firmware_path "$@" ;;
        firmware-kind) cat "$(cmd_firmware_path "$@").kind" ;;
        audit-log) echo "$AUDIT_LOG" ;;
        state-dir) echo "$STATE" ;;
        _ns-init) ns_init "$@" ;;
        *)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}" >&2
            [[ -z $cmd || $cmd == help || $cmd == -h || $cmd == --help ]] || exit 2
            ;;
    esac
}

main "$@"
