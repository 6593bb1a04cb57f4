#!/bin/sh
# Restore a dump into a database: the newest intact one, or BACKUP_FILE (a name in BACKUP_DIR).
#
# Environment: BACKUP_DIR, RESTORE_DATABASE (the database restored into; it must exist; default
# the tenant's own, PGDATABASE), and
# libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD
# (or DATABASE_SECRET_DIR). With RESTORE_CLEAN=1 the schemas the dump holds
# are dropped first (restoring over the instance's own database, the instance stopped): a
# partitioned table's inherited constraints cannot be dropped one by one as pg_restore --clean
# tries. Drop and restore are one transaction that stops at the first error: the database is
# restored whole or left as it was. Prints the name of the dump restored on its last line.
#
# With BROKER_DIR (the broker's data volume; the broker stopped: it reads the file only at its
# start), the dump's broker copy (or, when that one is missing or damaged, the newest intact
# older one) is checked, written into BROKER_DIR under a temporary name, flushed, and renamed
# over BROKER_FILE once the database is restored; without any intact copy the broker's own file
# is left as it is, and the script says so.
set -eu
here=$(dirname "$0")
. "$here/common.sh"
RESTORE_DATABASE=${RESTORE_DATABASE:-${PGDATABASE:-}}
[ -n "$RESTORE_DATABASE" ] || { echo "RESTORE_DATABASE (or PGDATABASE) must be set" >&2; exit 2; }

if [ -n "${BACKUP_FILE:-}" ]; then
    name=$BACKUP_FILE
    dump_intact "$name" || { echo "$name is missing or does not match its checksum" >&2; exit 1; }
else
    name=$(latest_dump) || { echo "no intact dump in $BACKUP_DIR" >&2; exit 1; }
fi
dump="$BACKUP_DIR/$name"
broker=""
if [ -n "${BROKER_DIR:-}" ]; then
    staged="$BROKER_DIR/.$BROKER_FILE.restore"
    trap 'rm -f "$staged"' EXIT
    if chosen=$(broker_copy_for "$name"); then
        broker=${chosen%% *}
        cp "$BACKUP_DIR/$broker" "$staged"
        chmod 600 "$staged"
        # Checked again where it lands: the bytes renamed into place are the checked ones.
        broker_json_valid "$staged" >/dev/null
        flush "$staged"
    else
        echo "no intact copy of the broker's $BROKER_FILE: the broker keeps its own" >&2
    fi
fi
# The schemas the dump creates (its table of contents: "<id>; <oid> <oid> SCHEMA - <name> ...").
schemas=$(pg_restore --list "$dump" | awk '$4 == "SCHEMA" && $5 == "-" { print $6 }')
{
    if [ "${RESTORE_CLEAN:-0}" = 1 ]; then
        for schema in $schemas; do
            printf 'DROP SCHEMA IF EXISTS "%s" CASCADE;\n' "$schema"
        done
    fi
    # POSIX sh has no pipefail: when pg_restore fails part way, end any COPY it was in and
    # send an error, so that psql rolls the whole transaction back instead of committing half.
    if ! pg_restore --no-owner --no-privileges --file=- "$dump"; then
        printf '\n\\.\nDO $$ BEGIN RAISE EXCEPTION %s; END $$;\n' "'pg_restore failed'"
    fi
} | psql -X -q --single-transaction -v ON_ERROR_STOP=1 -d "$RESTORE_DATABASE" >/dev/null
summary="restored $name into $RESTORE_DATABASE"
if [ -n "$broker" ]; then
    mv "$staged" "$BROKER_DIR/$BROKER_FILE"
    flush "$BROKER_DIR"
    summary="$summary; broker ${chosen}"
    echo "broker $chosen"
elif [ -n "${BROKER_DIR:-}" ]; then
    summary="$summary; broker kept its own file (no intact copy)"
fi
echo "$name"
if [ -w /dev/termination-log ]; then echo "$summary" >/dev/termination-log; fi
