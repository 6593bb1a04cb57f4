-- Private state of the signup service, never on the log and never replayed.

-- A signup whose append was not acknowledged (a timeout, a connection lost after sending) may
-- or may not be on the log. Its credential keeps the exact event it sent, so a retry with the
-- same email and password appends that very event again (JetStream stores an event id once,
-- and the email's subject takes one signup) and finds the first outcome instead of a 409.
-- A credential is in force once its customer has an account: the account view is built from
-- the log, so its row proves the CustomerSignedUp was stored, whether or not the request that
-- sent it lived to mark it confirmed.
ALTER TABLE credentials ADD COLUMN pending_envelope bytea;

CREATE INDEX credentials_email ON credentials (email);
