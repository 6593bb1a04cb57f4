#!/bin/sh
# A backup of the tenant's database, as the CronJob "tenant-backup" runs it.
#
# Environment: BACKUP_DIR (the "backups" volume), BACKUP_KEEP (complete dumps kept), and
# libpq's PGHOST and PGPORT, and PGUSER, PGPASSWORD, PGDATABASE
# or DATABASE_SECRET_DIR (files user, password, database). Needs pg_dump and pg_restore of the
# server's major version (the Postgres image's own), sha256sum and sync.
#
# The dump is written under a temporary name, read back (pg_restore --list), flushed and
# renamed; its checksum file is written the same way after it. Only then are dumps beyond the
# newest BACKUP_KEEP removed: a failed run never costs an older good dump.
set -eu
here=$(dirname "$0")
. "$here/common.sh"
BACKUP_KEEP=${BACKUP_KEEP:?BACKUP_KEEP must say how many dumps to keep}
case $BACKUP_KEEP in
    '' | *[!0-9]* | 0) echo "BACKUP_KEEP must be a whole number above 0" >&2; exit 2 ;;
esac

mkdir -p "$BACKUP_DIR"
# A run killed outright (SIGKILL, a node lost) leaves its partial files: the CronJob never runs
# two at once (concurrencyPolicy Forbid), so any partial file now is such a leftover.
rm -f "$BACKUP_DIR"/.partial-*

stamp=$(date -u +%Y%m%dT%H%M%SZ)
# Runs within one second (a retried Job) number their dumps above every one of that second, so
# that the newest always sorts last, even after older ones of that second were pruned.
n=0
for f in "$BACKUP_DIR"/dump-"$stamp"-*.dump "$BACKUP_DIR"/dump-"$stamp"-*.dump.sha256; do
    [ -e "$f" ] || continue
    k=${f#"$BACKUP_DIR"/dump-"$stamp"-}
    k=${k%%.*}
    k=${k#0}
    if [ "$k" -ge "$n" ]; then n=$((k + 1)); fi
done
name=$(printf 'dump-%s-%02d.dump' "$stamp" "$n")
partial="$BACKUP_DIR/.partial-$name"
trap 'rm -f "$partial" "$partial.sha256"' EXIT

pg_dump --format=custom --file="$partial"
pg_restore --list "$partial" >/dev/null
flush "$partial"
mv "$partial" "$BACKUP_DIR/$name"
(cd "$BACKUP_DIR" && sha256sum "$name") >"$partial.sha256"
flush "$partial.sha256"
mv "$partial.sha256" "$BACKUP_DIR/$name.sha256"
flush "$BACKUP_DIR"
dump_intact "$name" || { echo "the new dump $name does not match its checksum" >&2; exit 1; }

# Prune only now, and only complete dumps: keep the newest BACKUP_KEEP.
i=0
for old in $(dump_names); do
    i=$((i + 1))
    if [ "$i" -le "$BACKUP_KEEP" ]; then continue; fi
    rm -f "$BACKUP_DIR/$old.sha256" "$BACKUP_DIR/$old"
    echo "pruned $old"
done
# Checksum files whose dump is gone, and dumps that never got one (a run killed between the
# two renames: no other run is going, so none is still being written).
for sum in "$BACKUP_DIR"/dump-*.dump.sha256; do
    if [ -f "$sum" ] && [ ! -f "${sum%.sha256}" ]; then rm -f "$sum"; fi
done
for dump in "$BACKUP_DIR"/dump-*.dump; do
    if [ -f "$dump" ] && [ ! -f "$dump.sha256" ]; then rm -f "$dump"; fi
done
flush "$BACKUP_DIR"
size=$(wc -c <"$BACKUP_DIR/$name" | tr -d ' ')
echo "backup $name complete: $size bytes, sha256 $(cut -d' ' -f1 "$BACKUP_DIR/$name.sha256")"
