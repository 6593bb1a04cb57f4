-- Quotas that explain themselves (``quotas.py``).
--
-- The readings' token bucket: its level at ``at`` (it refills from there at the daily budget
-- spread over the day), saved with every batch so a restart does not hand out a full bucket.
CREATE TABLE quota_bucket (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    level double precision NOT NULL,
    at timestamptz NOT NULL
);

-- How far each meter has been noticed in its period: the day for the daily meters, the current
-- crossing for devices (a new one starts when the count falls back below a level noticed).
CREATE TABLE quota_meter_levels (
    meter text PRIMARY KEY,
    period text NOT NULL,
    level integer NOT NULL
);

-- A notice at 80% and at 100% of a meter, once per period; ``reported_at`` once the control
-- plane (which mails the customer) has it.
CREATE TABLE quota_notices (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    meter text NOT NULL,
    period text NOT NULL,
    level integer NOT NULL,
    used bigint NOT NULL,
    quota bigint NOT NULL,
    reported_at timestamptz,
    UNIQUE (meter, period, level)
);

CREATE INDEX quota_notices_unreported ON quota_notices (id) WHERE reported_at IS NULL;

-- What a limit refused, one row per meter, device and minute (not one per reading).
CREATE TABLE quota_limited (
    id bigserial PRIMARY KEY,
    minute timestamptz NOT NULL,
    meter text NOT NULL,
    device_id text,
    quota bigint NOT NULL,
    what text NOT NULL,
    count bigint NOT NULL,
    first_at timestamptz NOT NULL,
    last_at timestamptz NOT NULL
);

CREATE UNIQUE INDEX quota_limited_once ON quota_limited (meter, (coalesce(device_id, '')), minute);
CREATE INDEX quota_limited_recent ON quota_limited (minute);
