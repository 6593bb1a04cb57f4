#!/bin/sh
# A backup of the tenant's database, as the CronJob "tenant-backup" runs it.
#
# Environment: BACKUP_DIR (the "backups" volume), BACKUP_KEEP (complete dumps kept), and
# libpq's PGHOST and PGPORT, and PGUSER, PGPASSWORD, PGDATABASE
# or DATABASE_SECRET_DIR (files user, password, database). Needs pg_dump and pg_restore of the
# server's major version (the Postgres image's own), sha256sum and sync; with BROKER_DIR, psql
# 16 or later against a server 16 or later (\bind, pg_input_is_valid) to check the broker copy.
#
# The dump is written under a temporary name, read back (pg_restore --list), flushed and
# renamed; its checksum file is written the same way after it. Only then are dumps beyond the
# newest BACKUP_KEEP removed: a failed run never costs an older good dump.
#
# With BROKER_DIR (the broker's data volume, mounted read-only), the broker's dynamic-security
# file (BROKER_FILE) is copied next to the new dump, under its stem, after it (so the copy has
# every device the dump has): copied under a temporary name, checked whole (it is JSON with the
# expected shape: Mosquitto may rewrite the file in place while it is read, and a torn copy
# must never count), flushed, renamed, and given its checksum file the same way. A copy that is
# not whole is taken again (BROKER_COPY_ATTEMPTS times, a second apart); if none is, the run
# fails before pruning, keeping the new dump and every older dump with its broker copy.
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
broker_partial="$BACKUP_DIR/.partial-$(broker_copy_name "$name")"
trap 'rm -f "$partial" "$partial.sha256" "$broker_partial" "$broker_partial.sha256"' EXIT

pg_dump --format=custom --file="$partial"
pg_restore --list "$partial" >/dev/null
flush "$partial"
mv "$partial" "$BACKUP_DIR/$name"
(cd "$BACKUP_DIR" && sha256sum "$name") >"$partial.sha256"
flush "$partial.sha256"
mv "$partial.sha256" "$BACKUP_DIR/$name.sha256"
flush "$BACKUP_DIR"
dump_intact "$name" || { echo "the new dump $name does not match its checksum" >&2; exit 1; }

if [ -n "${BROKER_DIR:-}" ]; then
    copy=$(broker_copy_name "$name")
    attempts=${BROKER_COPY_ATTEMPTS:-5}
    tried=0
    clients=""
    while [ "$tried" -lt "$attempts" ]; do
        tried=$((tried + 1))
        if cp "$BROKER_DIR/$BROKER_FILE" "$broker_partial" && chmod 600 "$broker_partial" \
            && clients=$(broker_json_valid "$broker_partial"); then
            break
        fi
        clients=""
        echo "the copy of $BROKER_DIR/$BROKER_FILE is not whole (attempt $tried of $attempts)" >&2
        if [ "$tried" -lt "$attempts" ]; then sleep "${BROKER_COPY_PAUSE:-1}"; fi
    done
    if [ -z "$clients" ]; then
        echo "no whole copy of the broker's $BROKER_FILE: $name is kept, nothing is pruned" >&2
        exit 1
    fi
    flush "$broker_partial"
    mv "$broker_partial" "$BACKUP_DIR/$copy"
    (cd "$BACKUP_DIR" && sha256sum "$copy") >"$broker_partial.sha256"
    flush "$broker_partial.sha256"
    mv "$broker_partial.sha256" "$BACKUP_DIR/$copy.sha256"
    flush "$BACKUP_DIR"
    broker_copy_intact "$copy" >/dev/null || { echo "the new $copy is not intact" >&2; exit 1; }
    echo "broker $copy complete: $clients"
fi

# Prune only now, and only complete dumps: keep the newest BACKUP_KEEP.
i=0
for old in $(dump_names); do
    i=$((i + 1))
    if [ "$i" -le "$BACKUP_KEEP" ]; then continue; fi
    old_copy=$(broker_copy_name "$old")
    rm -f "$BACKUP_DIR/$old.sha256" "$BACKUP_DIR/$old" "$BACKUP_DIR/$old_copy.sha256" \
        "$BACKUP_DIR/$old_copy"
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
# Broker copies whose dump is gone (pruned with it), and copies that never got a checksum.
for copy in "$BACKUP_DIR"/dump-*.dynsec.json; do
    [ -f "$copy" ] || continue
    if [ ! -f "${copy%.dynsec.json}.dump" ] || [ ! -f "$copy.sha256" ]; then rm -f "$copy"; fi
done
for sum in "$BACKUP_DIR"/dump-*.dynsec.json.sha256; do
    if [ -f "$sum" ] && [ ! -f "${sum%.sha256}" ]; then rm -f "$sum"; fi
done
flush "$BACKUP_DIR"
size=$(wc -c <"$BACKUP_DIR/$name" | tr -d ' ')
echo "backup $name complete: $size bytes, sha256 $(cut -d' ' -f1 "$BACKUP_DIR/$name.sha256")"
