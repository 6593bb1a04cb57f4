-- The temperature offset the platform added to a reading at ingest (a fleet device's desired
-- configuration, when the device does not apply it itself); null when none. The temperature
-- the device sent is the stored one minus this, so nothing is applied twice unnoticed.
ALTER TABLE readings ADD COLUMN temperature_offset real;
