-- Which leadership of a projection may write: each replica that takes the projection's lock
-- counts this up, and every transaction that applies events checks it under the checkpoint's
-- row lock, so a replica that lost its lock unnoticed cannot apply events any more.
ALTER TABLE projection_checkpoints ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
