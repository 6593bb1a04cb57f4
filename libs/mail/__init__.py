"""Mail a service sends to people: queued in its own database, delivered by a supervised task.

``outbox.py`` keeps the mails (``queue_mail`` in the caller's transaction) and relays them;
``smtp.py`` hands one to an SMTP server, or, with no server configured, writes it to the
service's log and keeps it in the table for ``iotistic mail tail`` to show.
"""
