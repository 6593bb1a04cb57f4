-- A muted rule is kept (and can be unmuted) but not evaluated: it neither fires nor notifies.
ALTER TABLE alert_rules ADD COLUMN muted boolean NOT NULL DEFAULT false;
