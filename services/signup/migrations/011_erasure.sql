-- Right to erasure on an immutable log (issue 18, item 6).

-- The per-customer data keys that seal personal data in events (libs/sealing/vault.py): held
-- outside the log, in a schema of their own (every service that opens sealed data reads it;
-- signup alone makes and destroys keys). A key is wrapped by the platform's master key, which
-- is never stored here. Erasure keeps a tombstone: the key's id and when it was destroyed.
CREATE SCHEMA IF NOT EXISTS data_keys;
CREATE TABLE IF NOT EXISTS data_keys.customer_keys (
    customer_id text PRIMARY KEY,
    key_id text NOT NULL UNIQUE,
    master_id text NOT NULL,
    wrapped_key bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL))
);

-- The account view of an erased customer keeps no personal data: "erased" from erased_at on.
ALTER TABLE accounts
    ALTER COLUMN email DROP NOT NULL,
    ALTER COLUMN email_display DROP NOT NULL,
    ALTER COLUMN company_name DROP NOT NULL,
    ADD COLUMN erased_at timestamptz;

-- Private state: an erased customer's credential keeps only what makes a retried erasure
-- (or close) find the first outcome: its email is gone (an erasure of a customer who never had
-- a credential here leaves a row without a password).
ALTER TABLE credentials
    ALTER COLUMN email DROP NOT NULL,
    ALTER COLUMN password_hash DROP NOT NULL,
    ADD COLUMN erased_at timestamptz,
    ADD COLUMN erased_key_id text,
    -- Where the log stored the account's CustomerSignedUp (on its email's subject), once known.
    ADD COLUMN signup_seq bigint;

-- Private state: the email subjects erased customers held, and the sequence of their
-- CustomerSignedUp there. A new signup of that email appends expecting that sequence last (the
-- first writer still wins), so erasure does not lock the person out for good. The subject key
-- is a keyed hash of the email, as on the log.
CREATE TABLE released_email_subjects (
    subject_key text PRIMARY KEY,
    last_seq bigint NOT NULL,
    released_at timestamptz NOT NULL DEFAULT now()
);
