-- Fleet provisioning: keys that let devices register themselves, the devices they registered,
-- the audit trail of every registration and key exchange, the failures counted per address,
-- and each device's desired and reported configuration.

CREATE TABLE provisioning_keys (
    key_id text PRIMARY KEY,
    name text NOT NULL,
    -- sha256 of the key: the key itself is shown once and kept nowhere.
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    max_uses integer CHECK (max_uses > 0),
    uses integer NOT NULL DEFAULT 0,
    revoked_at timestamptz
);

-- A device registered by itself has the uuid it chose, its type, the hash of the API key it
-- proves at key exchange, the key it registered with, and when the exchange completed.
ALTER TABLE devices
    ADD COLUMN uuid text,
    ADD COLUMN device_type text,
    ADD COLUMN api_key_hash text,
    ADD COLUMN provisioning_key_id text REFERENCES provisioning_keys (key_id),
    ADD COLUMN key_exchanged_at timestamptz;
CREATE UNIQUE INDEX devices_uuid_active ON devices (uuid)
    WHERE uuid IS NOT NULL AND deleted_at IS NULL;

CREATE TABLE registration_audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    action text NOT NULL,   -- register | key-exchange
    outcome text NOT NULL,  -- accepted | refused
    reason text,
    address text NOT NULL,
    key_id text,
    uuid text
);
CREATE INDEX registration_audit_at ON registration_audit (at);

-- Failed registrations and key exchanges per client address, in a sliding window.
CREATE TABLE registration_failures (
    subject text PRIMARY KEY,
    window_started_at timestamptz NOT NULL,
    failures integer NOT NULL
);

CREATE TABLE device_config (
    device_id text PRIMARY KEY REFERENCES devices (device_id),
    desired jsonb NOT NULL,
    version integer NOT NULL,
    desired_at timestamptz NOT NULL,
    -- The version last published (retained) to the device's config topic.
    published_version integer NOT NULL DEFAULT 0,
    reported jsonb,
    reported_version integer,
    reported_at timestamptz
);
