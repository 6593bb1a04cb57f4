-- Private state of the signup service, never on the log and never replayed.

-- Signups per client address and overall, counted before any work so that every replica
-- refuses the same ones. A window ends at window_ends_at; the next signup opens a new one.
CREATE TABLE signup_windows (
    subject text PRIMARY KEY,
    window_ends_at timestamptz NOT NULL,
    signups integer NOT NULL
);
