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
