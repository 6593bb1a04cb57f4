-- A job retried by an operator, or given back by a worker shutting down, numbers its attempts
-- from where it was again: each such restart counts up its generation, which goes into the ids
-- of the events it records, so the outbox and JetStream never drop them as repeats.
ALTER TABLE queue_jobs ADD COLUMN generation integer NOT NULL DEFAULT 0;
