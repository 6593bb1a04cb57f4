-- The firmware version a device last reported in a JSON status, and when (null until then).
ALTER TABLE devices ADD COLUMN firmware text, ADD COLUMN firmware_reported_at timestamptz;
