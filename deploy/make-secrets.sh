#!/bin/sh
# The event bus's passwords for docker-compose.yml: one file per NATS user in
# deploy/secrets/nats/ (gitignored), each holding that user's password. A file that exists is
# kept, so running this again changes nothing; to change a password, delete its file, run this,
# then `docker compose up -d --force-recreate` (the nats-auth service rehashes them all).
#
#   deploy/make-secrets.sh && docker compose up -d --build
#
# The folder is the owner's only (0700): no other user of the host can reach the passwords.
# The files in it are 0644 because compose bind-mounts each one into its container with its
# host owner and mode (it cannot set them; docker/compose#9648) and the containers run as the
# image's uid 10001, not as you.
set -eu
umask 077

users="signup licensing billing provisioner operator"
folder="$(cd "$(dirname "$0")" && pwd)/secrets/nats"

mkdir -p "$folder"
chmod 700 "$folder"
for user in $users; do
    file="$folder/$user"
    if [ -f "$file" ] && [ -s "$file" ]; then
        continue
    fi
    if [ -e "$file" ] && [ ! -f "$file" ]; then
        # An older compose, started before this script, makes a folder where a secret is missing.
        echo "$0: $file is not a file; remove it and run this again" >&2
        exit 1
    fi
    # 32 random bytes as 64 hex digits: no character that needs quoting anywhere, and well
    # under bcrypt's 72 bytes.
    password=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    if [ "${#password}" -ne 64 ]; then
        echo "$0: could not read 32 random bytes from /dev/urandom" >&2
        exit 1
    fi
    tmp="$folder/.$user.$$"
    printf '%s' "$password" > "$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$file"
    echo "made $file"
done
