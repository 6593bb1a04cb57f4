-- Private state of the signup service, never on the log and never replayed.

-- Nonces of the sign-ins instances relayed with a signed browser address, so that one
-- assertion is believed once. Kept a few minutes: older assertions are refused by their age.
CREATE TABLE login_relay_nonces (
    nonce text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);
