-- Private state of the signup service, never on the log and never replayed.

-- Password hashes (argon2id). A row is written before its CustomerSignedUp is appended and
-- confirmed once the log took it, so a lost race or a crash in between leaves an unconfirmed
-- row that can never log in.
CREATE TABLE credentials (
    customer_id text PRIMARY KEY,
    email text NOT NULL,
    password_hash text NOT NULL,
    confirmed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX credentials_confirmed_email ON credentials (email) WHERE confirmed;

-- Answers to signups sent with an Idempotency-Key, so a retry gets the first answer.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    request_hash text NOT NULL,
    status_code integer,
    response jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Failed logins per email and per client address, for rate limiting across replicas.
CREATE TABLE login_failures (
    subject text PRIMARY KEY,
    window_started_at timestamptz NOT NULL,
    failures integer NOT NULL
);
