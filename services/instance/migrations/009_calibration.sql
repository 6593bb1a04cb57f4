-- Each device's BME688/BSEC calibration, followed at ingest from its readings' iaq_accuracy
-- (0: stabilising, 1-2: calibrating, 3: calibrated; a device that never sent it has no row:
-- unknown). Times are the readings' own. Written in the transaction that stores the readings.
CREATE TABLE calibration (
    device_id text PRIMARY KEY,
    accuracy smallint NOT NULL,
    state text NOT NULL,
    -- When the current state began.
    since timestamptz NOT NULL,
    -- When the current run began: the first reading, or the last drop back to 0.
    run_started timestamptz NOT NULL,
    -- When the current run first reached accuracy 3 (null until it does).
    run_calibrated timestamptz,
    -- Whether the current run has been at 1 or more (a 0 after that is a drop).
    run_reached_one boolean NOT NULL,
    first_seen timestamptz NOT NULL,
    -- The first time the sensor was ever calibrated: a sensor that was is a known one.
    first_calibrated timestamptz,
    drops integer NOT NULL DEFAULT 0,
    -- The newest reading taken into account: older ones arriving late change nothing.
    last_reading timestamptz NOT NULL
);

-- One row a run: from the first reading or a drop to the next drop.
CREATE TABLE calibration_runs (
    device_id text NOT NULL,
    started_at timestamptz NOT NULL,
    calibrated_at timestamptz,
    -- The drop that ended it (null while it is the current run).
    ended_at timestamptz,
    PRIMARY KEY (device_id, started_at)
);

-- Every change of state, newest read first.
CREATE TABLE calibration_changes (
    id bigserial PRIMARY KEY,
    device_id text NOT NULL,
    at timestamptz NOT NULL,
    from_state text NOT NULL,
    to_state text NOT NULL,
    accuracy smallint NOT NULL,
    -- A drop back to 0 after having been at 1 or more: a reset or a power cut.
    dropped boolean NOT NULL DEFAULT false
);

CREATE INDEX calibration_changes_device ON calibration_changes (device_id, at);
