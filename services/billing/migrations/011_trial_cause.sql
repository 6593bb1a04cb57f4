-- What a trial's expiry is decided on (issue 19): the TrialStarted's cause (event id,
-- correlation id, trace), set where the subscriptions projection records the trial, so the
-- scheduler's TrialExpired names it and links to its trace. Null for trials recorded before
-- this (until a replay rebuilds it from the log): those expire without a causation.
ALTER TABLE subscriptions ADD COLUMN trial_cause jsonb;
