-- A reading is one device's value at one time: the broker delivers at least once, so ingest
-- keys readings on (device_id, ts) (the partition column included, as Postgres requires) and
-- skips a reading stored already. Databases made before kept every copy, and their hourly
-- rollups counted each: remove the extra copies, rebuild the rollups of the hours that had
-- them, then add the key. The usage counts of past days cannot be told apart and stay.
CREATE TEMPORARY TABLE repeated_readings ON COMMIT DROP AS
SELECT device_id, ts FROM readings GROUP BY device_id, ts HAVING count(*) > 1;

DELETE FROM readings r
USING (
    SELECT tableoid, ctid
    FROM (
        SELECT x.tableoid, x.ctid,
               row_number() OVER (PARTITION BY x.device_id, x.ts ORDER BY x.ctid) AS copy
        FROM readings x JOIN repeated_readings USING (device_id, ts)
    ) numbered
    WHERE copy > 1
) extra
WHERE r.tableoid = extra.tableoid AND r.ctid = extra.ctid;

CREATE TEMPORARY TABLE repeated_hours ON COMMIT DROP AS
SELECT DISTINCT device_id, date_trunc('hour', ts, 'UTC') AS hour FROM repeated_readings;

DELETE FROM readings_hourly h
USING repeated_hours d
WHERE h.device_id = d.device_id AND h.hour = d.hour;

INSERT INTO readings_hourly (device_id, hour, metric, n, total, low, high)
SELECT r.device_id, d.hour, m.metric, count(*), sum(m.value), min(m.value), max(m.value)
FROM repeated_hours d
JOIN readings r
  ON r.device_id = d.device_id AND r.ts >= d.hour AND r.ts < d.hour + interval '1 hour'
CROSS JOIN LATERAL (VALUES
    ('temperature', r.temperature::double precision),
    ('humidity', r.humidity::double precision),
    ('pressure', r.pressure::double precision),
    ('gas_resistance', r.gas_resistance::double precision),
    ('iaq', r.iaq::double precision),
    ('iaq_accuracy', r.iaq_accuracy::double precision),
    ('co2_equivalent', r.co2_equivalent::double precision),
    ('breath_voc_equivalent', r.breath_voc_equivalent::double precision)
) AS m (metric, value)
WHERE m.value IS NOT NULL
GROUP BY 1, 2, 3;

-- The key's index serves the (device_id, ts) lookups the old index did.
ALTER TABLE readings ADD CONSTRAINT readings_one_per_device_and_time UNIQUE (device_id, ts);
DROP INDEX readings_device_ts;
