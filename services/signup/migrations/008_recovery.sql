-- Mail, email verification, forgotten passwords and closing an account (issue 16).

-- Private state, never on the log and never replayed: when sessions issued before a password
-- reset stop being honoured, and when the customer closed the account (set in the transaction
-- that queues its CustomerClosed, so a retried close finds it and appends nothing more).
ALTER TABLE credentials
    ADD COLUMN sessions_valid_from timestamptz,
    ADD COLUMN closed_at timestamptz,
    ADD COLUMN close_erase boolean;

-- One-time links mailed to a customer: verify the email, reset the password. Only a SHA-256
-- of the token is kept (the token itself is only in the mail); used once, until expires_at.
CREATE TABLE account_tokens (
    token_hash text PRIMARY KEY,
    purpose text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    customer_id text NOT NULL,
    email text NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX account_tokens_customer ON account_tokens (customer_id, purpose);

-- Mail waiting for the relay (libs/mail/outbox.py). Sent over SMTP, a mail's body is dropped.
CREATE TABLE mail_outbox (
    id bigserial PRIMARY KEY,
    recipient text NOT NULL,
    subject text NOT NULL,
    body text,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    sent_at timestamptz,
    delivered_by text,
    -- Refused for good, or not taken for days: no more tries (libs/mail/outbox.py).
    given_up_at timestamptz
);

CREATE INDEX mail_outbox_due ON mail_outbox (next_attempt_at)
    WHERE sent_at IS NULL AND given_up_at IS NULL;

-- Events decided with the private state above (EmailVerified, CredentialsChanged, CustomerClosed),
-- relayed to the log by libs/runtime/outbox.py.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    subject_key text NOT NULL,
    envelope bytea NOT NULL
);

-- The account view shows whether the email was verified, and when the password last changed.
ALTER TABLE accounts
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN password_changed_at timestamptz;
