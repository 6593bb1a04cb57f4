-- Which state of which invoice billing has put on the log (InvoiceRecorded), so that Stripe's
-- retries, its several event types for one payment (invoice.paid, invoice.payment_succeeded)
-- and a webhook stored again long after JetStream's duplicate window record it once.
CREATE TABLE stripe_invoices (
    stripe_invoice_id text NOT NULL,
    status text NOT NULL,
    customer_id text NOT NULL,
    PRIMARY KEY (stripe_invoice_id, status)
);
