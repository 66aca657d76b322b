#!/usr/bin/env bash
# cryptfuse demo (run by `make demo`): create encrypted containers, mount them with
# cryptfuse and use the volume file they expose.
#
#   1. a dm-crypt plain container (aes-xts-plain64, raw 512-bit key from a key file)
#   2. a LUKS2 container made by cryptsetup (when cryptsetup is installed)
#
# As root (with loop devices) each volume gets an ext4 file system through losetup; a file
# is written, read back, and the plain container is mounted again to show the file
# survived.  Otherwise the volume file is written and read with dd.  Everything is torn
# down in order (umount, losetup -d, fusermount3 -u); a trap does it on failure too.
#
# Environment: CRYPTFUSE (default .venv/bin/cryptfuse), DEMO_DIR (default: a new
# directory under /tmp, removed at the end unless DEMO_KEEP=1), DEMO_LOOP=0 (take the
# dd path even as root).
set -euo pipefail

cd "$(dirname "$0")/.."
CRYPTFUSE=${CRYPTFUSE:-$PWD/.venv/bin/cryptfuse}
SIZE_MIB=64

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ -x "$CRYPTFUSE" ] || die "$CRYPTFUSE not found: run 'make setup' first"
command -v fusermount3 >/dev/null || die "fusermount3 not found (Debian package fuse3)"
[ -e /dev/fuse ] || die "/dev/fuse is missing: FUSE is not available here"

if [ -n "${DEMO_DIR:-}" ]; then
    mkdir -p "$DEMO_DIR"
    WORK=$(cd "$DEMO_DIR" && pwd)
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cryptfuse-demo.XXXXXX")
fi

# What is set up right now, so that cleanup undoes exactly that, innermost first.
FS_MOUNTS=()    # ext4 mount points
LOOPS=()        # loop devices
FUSE_MOUNTS=()  # cryptfuse mount points
CONTAINERS=()   # containers whose daemon may still be closing

wait_for_daemon() {
    # The daemon holds a flock on its container until it has flushed and closed it.
    flock -x -w 30 "$1" true || echo "demo: the daemon of $1 did not exit within 30 s" >&2
}

cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    for ((i = ${#FS_MOUNTS[@]} - 1; i >= 0; i--)); do
        mountpoint -q "${FS_MOUNTS[i]}" && umount "${FS_MOUNTS[i]}" || true
    done
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do
        losetup -d "${LOOPS[i]}" 2>/dev/null || true
    done
    for ((i = ${#FUSE_MOUNTS[@]} - 1; i >= 0; i--)); do
        mountpoint -q "${FUSE_MOUNTS[i]}" && fusermount3 -u "${FUSE_MOUNTS[i]}" || true
    done
    for c in "${CONTAINERS[@]}"; do wait_for_daemon "$c"; done
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $WORK"
    else
        rm -rf "$WORK"
    fi
    if [ "$status" != 0 ]; then echo "demo: FAILED (exit $status)" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pop() { # remove $2 from the array named $1
    local -n arr=$1
    local kept=() x
    for x in "${arr[@]}"; do [ "$x" = "$2" ] || kept+=("$x"); done
    arr=("${kept[@]}")
}

mount_container() { # mount_container MOUNTPOINT CONTAINER [cryptfuse options...]
    local mnt=$1
    mkdir -p "$mnt"
    run "$CRYPTFUSE" "${@:3}" "$2" "$mnt"
    FUSE_MOUNTS+=("$mnt")
    CONTAINERS+=("$2")
    run ls -l "$mnt"
}

unmount_container() { # unmount_container MOUNTPOINT CONTAINER
    run fusermount3 -u "$1"
    pop FUSE_MOUNTS "$1"
    printf '+ (waiting until the daemon has flushed and closed %s)\n' "$2"
    wait_for_daemon "$2"
    pop CONTAINERS "$2"
}

can_loop() {
    [ "${DEMO_LOOP:-1}" = 1 ] && [ "$(id -u)" = 0 ] && command -v losetup >/dev/null && command -v mkfs.ext4 >/dev/null &&
        losetup -f >/dev/null 2>&1
}

attach() { # attach FILE [losetup options]: sets LOOP
    local shown=("${@:2}" "$1")
    printf '+ losetup -f --show %s\n' "${shown[*]}"
    LOOP=$(losetup -f --show "${@:2}" "$1")
    LOOPS+=("$LOOP")
    echo "$LOOP"
}

detach() {
    run losetup -d "$1"
    pop LOOPS "$1"
}

mount_fs() { # mount_fs DEVICE DIR [mount options]
    mkdir -p "$2"
    run mount "${@:3}" "$1" "$2"
    FS_MOUNTS+=("$2")
}

umount_fs() {
    run umount "$1"
    pop FS_MOUNTS "$1"
}

# exercise VOLUME_FILE NAME MESSAGE: put a file system with one file on the volume (root),
# or write and read a megabyte directly (everyone else).
exercise() {
    local volume=$1 name=$2 message=$3
    if can_loop; then
        step "$name: the volume file as a block device: losetup, mkfs.ext4, mount"
        attach "$volume"
        run mkfs.ext4 -q -F -L "$name" "$LOOP"
        mount_fs "$LOOP" "$WORK/$name-fs"
        step "$name: write a file on the ext4 file system and read it back"
        printf '+ echo "%s" > %s\n' "$message" "$WORK/$name-fs/hello.txt"
        echo "$message" >"$WORK/$name-fs/hello.txt"
        run sync
        local got
        got=$(cat "$WORK/$name-fs/hello.txt")
        printf '+ cat %s\n%s\n' "$WORK/$name-fs/hello.txt" "$got"
        [ "$got" = "$message" ] || die "read back '$got', expected '$message'"
        run df -h "$WORK/$name-fs"
        step "$name: tear down: umount, losetup -d"
        umount_fs "$WORK/$name-fs"
        detach "$LOOP"
    else
        step "$name: not root (or no loop devices): write and read the volume file with dd"
        run dd if=/dev/urandom of="$WORK/$name.sample" bs=1M count=1 status=none
        run dd if="$WORK/$name.sample" of="$volume" bs=1M seek=3 conv=notrunc,fsync status=none
        run dd if="$volume" of="$WORK/$name.readback" bs=1M skip=3 count=1 status=none
        run cmp "$WORK/$name.sample" "$WORK/$name.readback"
        echo "read back the megabyte written at offset 3 MiB: identical"
    fi
}

echo "cryptfuse demo in $WORK ($("$CRYPTFUSE" --version))"

# --- 1. dm-crypt plain --------------------------------------------------------------------
PLAIN=$WORK/plain.img
KEY=$WORK/plain.key
MSG="hello from a dm-crypt plain container, $(date -u +%FT%TZ)"

step "plain: a ${SIZE_MIB} MiB container and a 512-bit random key file (mode 0600)"
run truncate -s "${SIZE_MIB}M" "$PLAIN"
printf '+ head -c 64 /dev/urandom > %s\n' "$KEY"
(umask 077 && head -c 64 /dev/urandom >"$KEY")
run ls -l "$PLAIN" "$KEY"

PLAIN_OPTS=(--type plain --cipher aes-xts-plain64 --key-size 512 --key-file "$KEY")
step "plain: mount it; MNT/volume is the decrypted data (like /dev/mapper/NAME)"
mount_container "$WORK/plain-mnt" "$PLAIN" "${PLAIN_OPTS[@]}"

exercise "$WORK/plain-mnt/volume" plain "$MSG"

step "plain: unmount cryptfuse"
unmount_container "$WORK/plain-mnt" "$PLAIN"

step "plain: the container holds only ciphertext"
if grep -qa "hello from a dm-crypt plain" "$PLAIN"; then die "plaintext found in $PLAIN"; fi
echo "grep finds no plaintext in $PLAIN"

if can_loop; then
    step "plain: mount again with the same key: the file system and the file survived"
    mount_container "$WORK/plain-mnt" "$PLAIN" "${PLAIN_OPTS[@]}" --readonly
    attach "$WORK/plain-mnt/volume" --read-only
    run fsck.ext4 -n "$LOOP"
    mount_fs "$LOOP" "$WORK/plain-fs" -o ro
    got=$(cat "$WORK/plain-fs/hello.txt")
    printf '+ cat %s\n%s\n' "$WORK/plain-fs/hello.txt" "$got"
    [ "$got" = "$MSG" ] || die "after remount read '$got', expected '$MSG'"
    step "plain: tear down: umount, losetup -d, fusermount3 -u"
    umount_fs "$WORK/plain-fs"
    detach "$LOOP"
    unmount_container "$WORK/plain-mnt" "$PLAIN"
fi

# --- 2. LUKS2 -----------------------------------------------------------------------------
if ! command -v cryptsetup >/dev/null; then
    step "LUKS2: skipped (cryptsetup is not installed; Debian package cryptsetup-bin)"
else
    LUKS=$WORK/luks2.img
    PASS=$WORK/luks2.pass
    step "LUKS2: format a ${SIZE_MIB} MiB container with cryptsetup (fast PBKDF2 for the demo)"
    run truncate -s "${SIZE_MIB}M" "$LUKS"
    printf '+ (a random passphrase) > %s\n' "$PASS"
    (umask 077 && printf '%s' "demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$PASS")
    run cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
        --pbkdf-force-iterations 1000 --key-file "$PASS" "$LUKS"

    step "LUKS2: a wrong passphrase is refused (exit code 2), nothing is mounted"
    printf 'not-the-passphrase' >"$WORK/wrong.pass"
    mkdir -p "$WORK/luks2-mnt"
    set +e
    run "$CRYPTFUSE" --key-file "$WORK/wrong.pass" "$LUKS" "$WORK/luks2-mnt"
    rc=$?
    set -e
    echo "exit code $rc"
    [ "$rc" = 2 ] || die "expected exit code 2 for a wrong passphrase, got $rc"

    step "LUKS2: mount it with the passphrase from the key file"
    mount_container "$WORK/luks2-mnt" "$LUKS" --key-file "$PASS"

    exercise "$WORK/luks2-mnt/volume" luks2 "hello from LUKS2"

    step "LUKS2: unmount cryptfuse"
    unmount_container "$WORK/luks2-mnt" "$LUKS"
fi

step "done: every mount and loop device is gone"
