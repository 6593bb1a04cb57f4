-- What asked for each job (a contracts.Cause as JSON: event id, correlation id, trace context):
-- the DeploymentRequested that queued it, or the DeploymentRetried of an operator's retry. Every
-- event the job records names it as its causation, and the job's spans continue its trace.
-- Jobs queued before this column existed have none.
ALTER TABLE queue_jobs ADD COLUMN cause jsonb;

-- The InstanceDegraded that opened the current episode, as a Cause: the health watch's redeploy
-- names it as what caused the deploy job.
ALTER TABLE instance_health ADD COLUMN degraded_cause jsonb;
