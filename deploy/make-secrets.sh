#!/bin/sh
# Every secret docker-compose.yml hands its containers, as files in deploy/secrets/ (gitignored):
#
#   deploy/secrets/nats/<user>       the event bus's passwords, one per NATS user
#   deploy/secrets/env/<VARIABLE>    one file per secret setting, exported by the targets'
#                                    entrypoint as the variable it is named after:
#     POSTGRES_PASSWORD, and DATABASE_URL made from it
#     ADMIN_TOKEN, SESSION_SECRET, PROVISIONER_SECRET, USAGE_SECRET, LOGIN_RELAY_SECRET,
#     DATA_KEYS_MASTER_KEY (lost, no sealed personal data can be read again: back it up)
#     LICENSE_PRIVATE_KEY            the license signing key (RSA 4096, PEM; needs openssl)
#     STRIPE_WEBHOOK_SECRET, STRIPE_SECRET_KEY   made empty: write your Stripe values in them
#
# A file that exists is kept, so running this again changes nothing; to change a secret, delete
# its file, run this, then `docker compose up -d --force-recreate` (the nats-auth service
# rehashes the bus passwords). Postgres takes POSTGRES_PASSWORD only when it first makes its
# database: to change it later, ALTER ROLE iotistic in psql too. A new LICENSE_PRIVATE_KEY
# signs from then on; licenses signed with the old one no longer verify.
#
#   deploy/make-secrets.sh && docker compose up -d --build
#
# The folders are the owner's only (0700): no other user of the host can reach the secrets.
# The files in them are 0644 because compose bind-mounts each one into its container with its
# host owner and mode (it cannot set them; docker/compose#9648) and the containers run as the
# image's uid 10001 (Postgres as its own), not as you.
set -eu
umask 077

users="signup licensing billing provisioner operator"
generated="POSTGRES_PASSWORD ADMIN_TOKEN SESSION_SECRET PROVISIONER_SECRET USAGE_SECRET LOGIN_RELAY_SECRET DATA_KEYS_MASTER_KEY"
yours="STRIPE_WEBHOOK_SECRET STRIPE_SECRET_KEY"
secrets="$(cd "$(dirname "$0")" && pwd)/secrets"

# Whether $1 is already there (and not empty, unless $2 is "empty-ok"); refuses a folder where
# a file belongs (an older compose, started before this script, makes one for a missing secret).
present() {
    if [ -e "$1" ] && [ ! -f "$1" ]; then
        echo "$0: $1 is not a file; remove it and run this again" >&2
        exit 1
    fi
    [ -f "$1" ] && { [ -s "$1" ] || [ "${2:-}" = "empty-ok" ]; }
}

# Writes stdin to $1 whole or not at all, readable by the containers' users.
install_file() {
    tmp="$(dirname "$1")/.$(basename "$1").$$"
    cat > "$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$1"
}

# 32 random bytes as 64 hex digits: no character that needs quoting anywhere (a URL included),
# and well under bcrypt's 72 bytes.
random_hex() {
    value=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    if [ "${#value}" -ne 64 ]; then
        echo "$0: could not read 32 random bytes from /dev/urandom" >&2
        exit 1
    fi
    printf '%s' "$value"
}

mkdir -p "$secrets/nats" "$secrets/env"
chmod 700 "$secrets" "$secrets/nats" "$secrets/env"

for user in $users; do
    file="$secrets/nats/$user"
    present "$file" && continue
    random_hex | install_file "$file"
    echo "made $file"
done

for name in $generated; do
    file="$secrets/env/$name"
    present "$file" && continue
    random_hex | install_file "$file"
    echo "made $file"
done

# Made from the password every time (same password, same file), so the two always agree.
url="postgresql://iotistic:$(cat "$secrets/env/POSTGRES_PASSWORD")@postgres:5432/iotistic"
present "$secrets/env/DATABASE_URL" empty-ok || true
if [ ! -f "$secrets/env/DATABASE_URL" ] || [ "$(cat "$secrets/env/DATABASE_URL")" != "$url" ]; then
    printf '%s' "$url" | install_file "$secrets/env/DATABASE_URL"
    echo "made $secrets/env/DATABASE_URL"
fi

file="$secrets/env/LICENSE_PRIVATE_KEY"
if ! present "$file"; then
    if ! command -v openssl > /dev/null 2>&1; then
        echo "$0: openssl is needed to make the license signing key $file" >&2
        exit 1
    fi
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 2> /dev/null | install_file "$file"
    if ! grep -q "BEGIN PRIVATE KEY" "$file"; then
        rm -f "$file"
        echo "$0: openssl did not make a key for $file" >&2
        exit 1
    fi
    echo "made $file"
fi

for name in $yours; do
    file="$secrets/env/$name"
    present "$file" empty-ok && continue
    : | install_file "$file"
    echo "made $file (empty: write yours into it)"
done
