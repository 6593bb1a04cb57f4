-- Which event stream each projection has read: the stream's creation time. A stream lost and
-- created again restarts its sequences at 1, which a checkpoint would take for events already
-- applied; the runner compares this before it consumes and stops, visibly, on a mismatch.
ALTER TABLE projection_checkpoints ADD COLUMN stream_created timestamptz;
