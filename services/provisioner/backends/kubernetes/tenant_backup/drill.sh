#!/bin/sh
# The restore drill: restore the newest intact dump into a scratch database, count the rows of
# every table the dump holds, and drop the scratch database again, whatever happened.
#
# Environment: BACKUP_DIR; libpq's PGHOST, PGPORT, PGUSER, and PGPASSWORD and PGDATABASE or
# DATABASE_SECRET_DIR (files password, database): a user that may create databases (the
# tenant's superuser), connected to the tenant's database; DRILL_SCHEMA (the tables counted;
# default "instance"). Prints one line per table, "rows <schema.table> <n>", then
# "drill ok <dump> sha256 <hash> tables <n> rows <total>"; the last line also goes to the
# container's termination message, where `iotistic provisioner restore-drill` reads it.
# The broker copy a restore of that dump would use (its own, or the newest intact older one)
# is checked too (checksum, a whole dynamic-security file): the last line then ends with
# "broker <copy> sha256 <hash> clients <n>", and the drill fails without one.
set -eu
here=$(dirname "$0")
. "$here/common.sh"
schema=${DRILL_SCHEMA:-instance}
scratch="restore_drill_$(date -u +%Y%m%d%H%M%S)_$$"

name=$(latest_dump) || { echo "drill failed: no intact dump in $BACKUP_DIR" >&2; exit 1; }
chosen=$(broker_copy_for "$name") || {
    echo "drill failed: no intact copy of the broker's $BROKER_FILE for $name" >&2
    exit 1
}
broker=${chosen%% *}
# No other session is on the scratch database when it goes (each psql above has ended).
drop() { psql -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$scratch\""; }
trap drop EXIT
psql -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$scratch\""
RESTORE_DATABASE=$scratch BACKUP_FILE=$name sh "$here/restore.sh" >/dev/null

# Every table of the schema that is not a partition (a partitioned table counts its partitions).
tables=$(psql -X -A -t -v ON_ERROR_STOP=1 -d "$scratch" -v schema="$schema" <<'SQL'
SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = :'schema' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY 1;
SQL
)
[ -n "$tables" ] || { echo "drill failed: the dump holds no table in schema $schema" >&2; exit 1; }
count=0
total=0
for table in $tables; do
    rows=$(psql -X -A -t -v ON_ERROR_STOP=1 -d "$scratch" -c "SELECT count(*) FROM $table")
    echo "rows $table $rows"
    count=$((count + 1))
    total=$((total + rows))
done
summary="drill ok $name sha256 $(cut -d' ' -f1 "$BACKUP_DIR/$name.sha256") tables $count rows $total"
summary="$summary broker $broker sha256 $(cut -d' ' -f1 "$BACKUP_DIR/$broker.sha256") ${chosen#* }"
echo "$summary"
if [ -w /dev/termination-log ]; then echo "$summary" >/dev/termination-log; fi
