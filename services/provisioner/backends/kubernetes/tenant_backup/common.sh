# Sourced by backup.sh, restore.sh and drill.sh: where dumps live and which ones count.
#
# A dump counts only once it is complete: written under a ".partial-" name, flushed, renamed to
# dump-<UTC time>-<NN>.dump, and then given a checksum file, <dump>.sha256, written the same way.
# A dump without its checksum file, or whose bytes no longer match it, is never picked.

BACKUP_DIR=${BACKUP_DIR:?BACKUP_DIR must name the backup folder}

# The tenant's "database" Secret, mounted as files (not put in the environment, where any
# process listing would show it): its user, password and database for libpq.
# (Without a "user" file, PGUSER is the one the environment names: the drill's superuser.)
if [ -n "${DATABASE_SECRET_DIR:-}" ]; then
    if [ -f "$DATABASE_SECRET_DIR/user" ]; then PGUSER=$(cat "$DATABASE_SECRET_DIR/user"); fi
    PGPASSWORD=$(cat "$DATABASE_SECRET_DIR/password")
    PGDATABASE=$(cat "$DATABASE_SECRET_DIR/database")
    export PGUSER PGPASSWORD PGDATABASE
fi

# Names of complete dumps, newest first (the names sort by time).
dump_names() {
    for f in "$BACKUP_DIR"/dump-*.dump; do
        [ -f "$f" ] || continue
        [ -f "$f.sha256" ] || continue
        basename "$f"
    done | sort -r
}

# Whether the dump's bytes match its checksum file.
dump_intact() {
    (cd "$BACKUP_DIR" && sha256sum -c --status "$1.sha256") 2>/dev/null
}

# The newest complete, intact dump (a name), or nothing; says which ones it passed over.
latest_dump() {
    for name in $(dump_names); do
        if dump_intact "$name"; then
            echo "$name"
            return 0
        fi
        echo "skipping $name: its checksum does not match" >&2
    done
    return 1
}

# Flush a file (or folder) to disk: coreutils' sync takes paths.
flush() {
    sync "$@"
}

# The broker's state: each dump-<...>.dump may have, under the same stem, a copy of Mosquitto's
# dynamic-security file (its clients with their password hashes, roles and ACLs),
# dump-<...>.dynsec.json, and its checksum file, <copy>.sha256, written the same way as a dump's.
BROKER_FILE=${BROKER_FILE:-dynamic-security.json}

broker_copy_name() {
    echo "${1%.dump}.dynsec.json"
}

# Whether a file is a whole dynamic-security file: JSON (Postgres's own parser, which the
# scripts reach anyway; the document goes as a bound parameter, never into a statement's text,
# and pg_input_is_valid raises no error that would log it), an object with a "clients" and a
# "roles" array, each client an object with a user name. Prints "clients <n>" when it is.
broker_json_check() {
    psql -X -A -t -q -v ON_ERROR_STOP=1 -v file="$1" 2>/dev/null <<'SQL'
\set doc `cat :'file'`
SELECT pg_input_is_valid($1::text, 'json') AS valid \bind :doc \gset
\if :valid
SELECT CASE
    WHEN json_typeof(d) <> 'object' THEN 'not an object'
    WHEN json_typeof(d -> 'clients') IS DISTINCT FROM 'array' THEN 'no clients'
    WHEN json_typeof(d -> 'roles') IS DISTINCT FROM 'array' THEN 'no roles'
    WHEN EXISTS (
        SELECT FROM json_array_elements(d -> 'clients') c
        WHERE json_typeof(c) <> 'object' OR json_typeof(c -> 'username') IS DISTINCT FROM 'string'
    ) THEN 'a client without a user name'
    ELSE 'clients ' || json_array_length(d -> 'clients')
END FROM (SELECT $1::text::json AS d) s \bind :doc \g
\else
SELECT 'not JSON';
\endif
SQL
}

# "clients <n>" when the file is a whole dynamic-security file; otherwise says why, and fails.
broker_json_valid() {
    verdict=$(broker_json_check "$1") || verdict="unreadable"
    case $verdict in
        "clients "*) echo "$verdict" ;;
        *) echo "$1: ${verdict:-unreadable}" >&2; return 1 ;;
    esac
}

# Whether a broker copy (a name in BACKUP_DIR) matches its checksum and is whole; prints
# "clients <n>".
broker_copy_intact() {
    [ -f "$BACKUP_DIR/$1" ] && [ -f "$BACKUP_DIR/$1.sha256" ] || return 1
    (cd "$BACKUP_DIR" && sha256sum -c --status "$1.sha256") 2>/dev/null || return 1
    broker_json_valid "$BACKUP_DIR/$1"
}

# The broker copy a restore of dump $1 uses: its own, or, when that one is missing or damaged,
# the newest intact copy of an older dump (its clients are older than the database: devices
# registered since then must be registered again). Prints "<copy> clients <n>"; says which ones
# it passed over; fails when there is none.
broker_copy_for() {
    own=$(broker_copy_name "$1")
    for copy in $(broker_copy_names); do
        # Newest first: those of newer dumps than $1 do not go with it.
        newest=$(printf '%s\n%s\n' "$copy" "$own" | sort -r | head -n 1)
        if [ "$copy" != "$own" ] && [ "$newest" = "$copy" ]; then continue; fi
        if counted=$(broker_copy_intact "$copy"); then
            if [ "$copy" != "$own" ]; then
                echo "the broker copy of $1 is missing or damaged: using $copy, older" >&2
            fi
            echo "$copy $counted"
            return 0
        fi
        echo "skipping $copy: missing checksum, checksum mismatch, or not a whole file" >&2
    done
    return 1
}

# Names of the broker copies in BACKUP_DIR, newest first.
broker_copy_names() {
    for f in "$BACKUP_DIR"/dump-*.dynsec.json; do
        [ -f "$f" ] || continue
        basename "$f"
    done | sort -r
}
