-- Whose sessions still hold: the cut-off of each customer's latest credentials change and
-- when their account closed, projected from CredentialsChanged and CustomerClosed (signup's),
-- so this service refuses a session signup would refuse without asking signup.
CREATE TABLE account_access (
    customer_id text PRIMARY KEY,
    sessions_valid_from timestamptz,
    closed_at timestamptz
);
