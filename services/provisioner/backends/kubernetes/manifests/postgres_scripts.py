"""What the tenant's Postgres runs besides the server: the SQL and shell scripts that keep the
instance's own role (and the superuser's password) in step with the mounted Secret, and move a
tenant made before the instance had a role of its own.

They are kept as text here, not as files, because ``f``-strings put the same names and folders
into them that the StatefulSet mounts (``postgres``); the ConfigMap ``postgres-scripts``
carries them as they are.
"""

from __future__ import annotations

# Postgres: the superuser is the image's bootstrap user, known only to the Postgres pod; the
# instance connects as a role of its own that owns its database and nothing more.
PG_SUPERUSER = "postgres"
PG_INSTANCE_ROLE = "iotistic"
PG_DATABASE = "iotistic"
PG_SECRETS_DIR = "/etc/iotistic/postgres-secrets"
PG_SCRIPTS_DIR = "/etc/iotistic/postgres-scripts"
# Run by psql as the superuser over the local socket, at the first start (initdb.d) and on
# every start after (postStart): creates the instance's role if missing, gives it the password
# of the mounted Secret (so a rotated password takes effect), takes away every power beyond
# owning its database, and keeps the superuser's password in step too. A tenant made by a
# version before this, whose instance role is the bootstrap superuser (which Postgres does not
# let lose SUPERUSER), is first moved by migrate-instance-role.sql; were it not, only the
# role's password would be kept, and the log would say so.
PG_MIGRATION_ROLE = "iotistic_migration"
PG_ENSURE_SQL = f"""\\set ON_ERROR_STOP on
SET client_min_messages = warning;
\\getenv role_password IOTISTIC_ROLE_PASSWORD
\\getenv superuser_password IOTISTIC_SUPERUSER_PASSWORD
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS missing \\gset
\\if :missing
CREATE ROLE :"role" LOGIN;
\\endif
SELECT oid = 10 AS legacy, :'superuser' <> :'role' AS own_superuser
  FROM pg_roles WHERE rolname = :'role' \\gset
\\if :legacy
\\echo 'iotistic: the instance role is the bootstrap superuser (a tenant made before'
\\echo '  least privilege): only its password is kept in step'
ALTER ROLE :"role" PASSWORD :'role_password';
\\else
ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'role_password';
ALTER DATABASE :"db" OWNER TO :"role";
\\endif
\\if :own_superuser
ALTER ROLE :"superuser" PASSWORD :'superuser_password';
DROP ROLE IF EXISTS {PG_MIGRATION_ROLE};
\\endif
"""
# Once, for a tenant made before the instance had a role of its own: its instance role is the
# cluster's bootstrap superuser, which Postgres does not let lose SUPERUSER. Run (by a
# temporary superuser, in the instance's database, in one transaction) it is renamed to be the
# superuser, and a new instance role gets the database and everything in it the instance made.
PG_MIGRATE_SQL = """\\set ON_ERROR_STOP on
\\getenv role_password IOTISTIC_ROLE_PASSWORD
\\getenv superuser_password IOTISTIC_SUPERUSER_PASSWORD
BEGIN;
SELECT coalesce((SELECT oid = 10 FROM pg_roles WHERE rolname = :'role'), false)
   AND NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'superuser') AS legacy \\gset
\\if :legacy
\\echo 'iotistic: giving the instance a role of its own (a tenant made before least privilege)'
ALTER ROLE :"role" RENAME TO :"superuser";
ALTER ROLE :"superuser" PASSWORD :'superuser_password';
CREATE ROLE :"role" LOGIN PASSWORD :'role_password';
ALTER DATABASE :"db" OWNER TO :"role";
SELECT set_config('iotistic.owner', :'role', true);
DO $$
DECLARE
  owner text := current_setting('iotistic.owner');
  r record;
BEGIN
  FOR r IN SELECT nspname FROM pg_namespace
      WHERE nspowner = 10 AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', r.nspname, owner);
  END LOOP;
  -- Relations (indexes and owned sequences follow their tables).
  FOR r IN SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relowner = 10 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
        AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
        AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                        AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO %I',
      CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
        WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
      r.name, owner);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS name FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE p.proowner = 10 AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.name, owner);
  END LOOP;
  -- Types of their own (enums, domains, composites, ranges); a table's row type follows it.
  FOR r IN SELECT t.oid::regtype AS name FROM pg_type t
      JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE t.typowner = 10 AND t.typtype IN ('c', 'd', 'e', 'r')
        AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
        AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER TYPE %s OWNER TO %I', r.name, owner);
  END LOOP;
END
$$;
\\endif
COMMIT;
"""
PG_ENSURE_SH = f"""#!/bin/sh
# Keeps the instance's role in step with the mounted Secret (see ensure-instance-role.sql).
set -eu
secrets="${{IOTISTIC_POSTGRES_SECRETS:-{PG_SECRETS_DIR}}}"
scripts="${{IOTISTIC_POSTGRES_SCRIPTS:-{PG_SCRIPTS_DIR}}}"
superuser="${{POSTGRES_USER:-{PG_SUPERUSER}}}"
role="$(cat "$secrets/user")"
db="${{POSTGRES_DB:-{PG_DATABASE}}}"
export IOTISTIC_ROLE_PASSWORD IOTISTIC_SUPERUSER_PASSWORD
IOTISTIC_ROLE_PASSWORD="$(cat "$secrets/password")"
IOTISTIC_SUPERUSER_PASSWORD="$(cat "$secrets/superuser-password")"
run() {{
  psql -X -q -v ON_ERROR_STOP=1 -v role="$role" -v superuser="$superuser" -v db="$db" "$@"
}}
if ! run -U "$superuser" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
  # No such superuser: a tenant from before least privilege, whose instance role is the
  # bootstrap superuser (or the server does not answer, and this fails).
  run -U "$role" -d postgres -c 'SELECT 1' >/dev/null
  run -U "$role" -d postgres -c "CREATE ROLE {PG_MIGRATION_ROLE} SUPERUSER LOGIN" \\
    >/dev/null 2>&1 || true
  run -U {PG_MIGRATION_ROLE} -d "$db" -f "$scripts/migrate-instance-role.sql"
fi
run -U "$superuser" -d "$db" -f "$scripts/ensure-instance-role.sql"
echo "iotistic: instance role $role kept in step"
"""
# postStart: once the server answers over TCP (the first start's temporary server, which runs
# the initdb.d script, listens on its socket only: the two never race), run the ensure step.
# It never fails the container (a failed postStart would kill Postgres, perhaps in the middle
# of its first initdb); it writes why to the container's log, and the instance, refused, is
# not ready.
PG_POST_START_SH = """#!/bin/sh
# A hook's output is shown nowhere: write it to the container's log (its PID 1's stdout).
log="${IOTISTIC_LOG_TO:-/proc/1/fd/1}"
if [ -w "$log" ]; then exec >>"$log" 2>&1; fi
i=0
while [ "$i" -lt 300 ]; do
  if pg_isready -q -h 127.0.0.1 && sh "$(dirname "$0")/ensure-instance-role.sh"; then exit 0; fi
  i=$((i + 1))
  sleep 1
done
echo "iotistic: could not keep the instance role in step after 300s" >&2
"""
POSTGRES_SCRIPTS = {
    "ensure-instance-role.sql": PG_ENSURE_SQL,
    "migrate-instance-role.sql": PG_MIGRATE_SQL,
    "ensure-instance-role.sh": PG_ENSURE_SH,
    "post-start.sh": PG_POST_START_SH,
    # Sourced by the image's entrypoint at the first start, after initdb.
    "10-instance-role.sh": f"sh {PG_SCRIPTS_DIR}/ensure-instance-role.sh\n",
}
