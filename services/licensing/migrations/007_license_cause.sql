-- What a renewal is decided on (issue 19): the cause of the LicenseIssued that recorded each
-- license (event id, correlation id, trace), so the renewal scheduler's LicenseIssued names the
-- license it renews and links to its trace. Null for licenses recorded before this (until a
-- replay rebuilds it from the log): their renewals are appended without a causation.
ALTER TABLE licenses ADD COLUMN cause jsonb;
