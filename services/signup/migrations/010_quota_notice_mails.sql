-- The quota notices mailed (QuotaNoticeReported), one row per event: the mail is queued in the
-- same transaction as this row, so a notice delivered again is mailed once.
CREATE TABLE quota_notice_mails (
    event_id text PRIMARY KEY,
    customer_id text NOT NULL,
    mailed_at timestamptz NOT NULL DEFAULT now()
);

-- How many were mailed to a customer in the last day (a cap: ``quota_mails.MAX_MAILS_PER_DAY``).
CREATE INDEX quota_notice_mails_recent ON quota_notice_mails (customer_id, mailed_at);
