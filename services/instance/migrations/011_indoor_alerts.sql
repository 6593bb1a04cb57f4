-- Indoor-air alert kinds next to the threshold rules (offline, mould_risk, stale_sensor,
-- co2_high), each with its own parameters; whether a rule also looks at readings taken before
-- the sensor was calibrated; and the preset a rule was made from, when it was one of those an
-- instance gets by default. A rule of another kind than 'threshold' has no metric.
ALTER TABLE alert_rules
    ALTER COLUMN metric DROP NOT NULL,
    ADD COLUMN kind text NOT NULL DEFAULT 'threshold',
    ADD COLUMN params jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN include_calibrating boolean NOT NULL DEFAULT false,
    ADD COLUMN preset text;
-- A rule made before this version goes on looking at every reading, as its customer saw it do;
-- rules made from now on leave out readings taken before calibration unless they ask.
UPDATE alert_rules SET include_calibrating = true;

-- Why a rule fired (or resolved): a sentence for people and the values and window behind it.
ALTER TABLE alert_history
    ADD COLUMN explanation text,
    ADD COLUMN evidence jsonb;
ALTER TABLE alert_states ADD COLUMN explanation text;

-- The presets installed in this instance, each once: a customer who deletes one keeps it
-- deleted (the row here stays), and a preset added by a later version is installed at start.
CREATE TABLE alert_presets (
    preset text PRIMARY KEY,
    rule_id text NOT NULL,
    installed_at timestamptz NOT NULL
);

-- Where a rule's evaluation of a device has got to, per part of its condition: the newest
-- reading looked at (readings are read after it only, through the (device_id, ts) key) and
-- the current run of readings that meet the condition (from, to, how many, the lowest and
-- highest value, and what the run is of: the unchanged values of a stale sensor, say).
CREATE TABLE alert_windows (
    rule_id text NOT NULL,
    device_id text NOT NULL,
    part text NOT NULL,
    evaluated_to timestamptz NOT NULL,
    run_from timestamptz,
    run_to timestamptz,
    n integer NOT NULL DEFAULT 0,
    low double precision,
    high double precision,
    ref jsonb,
    PRIMARY KEY (rule_id, device_id, part)
);
