"""The queue's rules alone, without a database: collapsing, priorities, backoff, retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.provisioner.queue_rules import (
    DELETE,
    DEPLOY,
    UPDATE,
    Collapse,
    Kind,
    collapse,
    job_event_id,
    job_id_for,
    kind_for_license,
    lease_ran_out_on_last_attempt,
    next_attempt_delay,
    priority_of,
    retry_refusal,
)


@pytest.mark.parametrize(
    ("kind", "erase", "pending", "expected"),
    [
        # Nothing pending: a new job, nothing superseded.
        (DEPLOY, False, [], Collapse(None, ())),
        (DELETE, False, [], Collapse(None, ())),
        # A pending deploy covers a later deploy or update (it runs with the newest license).
        (DEPLOY, False, [("d1", DEPLOY)], Collapse("d1", ("d1",))),
        (UPDATE, False, [("d1", DEPLOY)], Collapse("d1", ("d1",))),
        # A new deploy or update supersedes a pending update.
        (UPDATE, False, [("u1", UPDATE)], Collapse(None, ("u1",))),
        (DEPLOY, False, [("u1", UPDATE)], Collapse(None, ("u1",))),
        # A pending removal covers everything: the customer is leaving.
        (DEPLOY, False, [("x1", DELETE)], Collapse("x1", ())),
        (UPDATE, False, [("u1", UPDATE), ("x1", DELETE)], Collapse("x1", ("u1",))),
        (DELETE, False, [("x1", DELETE)], Collapse("x1", ())),
        # An erasure merges into a pending removal only if that removal can be made to erase.
        (DELETE, True, [("x1", DELETE)], Collapse("x1", (), only_if_it_erases=True)),
        # A new removal supersedes pending deploys and updates.
        (DELETE, False, [("d1", DEPLOY), ("u1", UPDATE)], Collapse(None, ("d1", "u1"))),
        (DELETE, True, [("u1", UPDATE)], Collapse(None, ("u1",))),
        # The latest pending job of a kind is the one that covers.
        (DEPLOY, False, [("d1", DEPLOY), ("d2", DEPLOY)], Collapse("d2", ("d1", "d2"))),
    ],
)
def test_a_request_collapses_into_the_pending_jobs_by_the_rules(
    kind: Kind, erase: bool, pending: list[tuple[str, str]], expected: Collapse
) -> None:
    assert collapse(kind, erase, pending) == expected


@pytest.mark.parametrize(
    ("kind", "plan", "priority"),
    [
        (DELETE, "trial", 1),
        (DEPLOY, "enterprise", 1),
        (DEPLOY, "professional", 2),
        (UPDATE, "enterprise", 3),
        (DEPLOY, "starter", 3),
        (DEPLOY, "trial", 5),
        (DEPLOY, None, 5),
        (DEPLOY, "unknown", 5),
    ],
)
def test_priorities(kind: str, plan: str | None, priority: int) -> None:
    assert priority_of(kind, plan) == priority


def test_a_license_deploys_first_and_updates_after() -> None:
    assert kind_for_license(deployed=False, deploy_queued=False) == DEPLOY
    assert kind_for_license(deployed=True, deploy_queued=False) == UPDATE
    assert kind_for_license(deployed=False, deploy_queued=True) == UPDATE


def test_backoff_doubles_with_each_attempt() -> None:
    base = timedelta(seconds=5)
    assert [next_attempt_delay(base, n).total_seconds() for n in (1, 2, 3, 4)] == [5, 10, 20, 40]


def test_a_lease_that_ran_out_on_the_last_attempt_fails_the_job() -> None:
    assert lease_ran_out_on_last_attempt("active", 3, 3)
    assert not lease_ran_out_on_last_attempt("active", 2, 3)
    assert not lease_ran_out_on_last_attempt("waiting", 3, 3)


def test_only_failed_jobs_not_overtaken_are_retried() -> None:
    assert retry_refusal("j", "failed", None) is None
    assert retry_refusal("j", "completed", None) == (
        "job j is completed; only failed jobs are retried"
    )
    assert "overtaken by the customer's later job k" in str(retry_refusal("j", "failed", "k"))


def test_job_ids_and_event_ids() -> None:
    at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert job_id_for("c", at) == f"deploy-c-{int(at.timestamp() * 1000)}"
    assert job_event_id("j", 0, "started", 1) == "j:started:1"
    assert job_event_id("j", 2, "started", 1) == "j:g2:started:1"
