"""The admin page's templates alone: what the outside world wrote (job errors, customer ids,
steps) is escaped wherever it shows, and the forms carry the page's CSRF token."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from libs.http.errors import InvalidRequest
from services.provisioner.admin_page import (
    VIEW_STATES,
    admin_templates,
    csrf_token,
    known_state,
    when,
)
from services.provisioner.queue_rules import FINISHED

MARKUP = "<script>alert('x')</script>&\"'"
TOKEN = csrf_token("t" * 32)


def a_job(job_id: str, state: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "name": "deploy-customer-stack",
        "state": state,
        "progress": 40,
        "step": MARKUP,
        "priority": 3,
        "attempts": 1,
        "maxAttempts": 3,
        "timestamp": 1_767_323_045_000,
        "processedOn": None,
        "finishedOn": None,
        "failedReason": MARKUP,
        "supersededBy": None,
        "waitingFor": None,
        "data": {"customerId": MARKUP, "requested_by": MARKUP},
        "attemptsLog": [{"attempt": 1, "worker": MARKUP, "outcome": "failed", "error": MARKUP}],
    }


def render(name: str, **context: Any) -> str:
    return admin_templates().get_template(name).render(csrf=TOKEN, **context)


def queues_page(jobs: list[dict[str, Any]], state: str = "failed") -> str:
    counts = dict.fromkeys(VIEW_STATES, 0)
    return render(
        "admin/queues.html",
        title="Deployment queue",
        state=state,
        states=VIEW_STATES,
        finished=FINISHED,
        counts=counts,
        paused=False,
        jobs=jobs,
    )


def test_markup_in_a_job_is_escaped_on_the_list() -> None:
    page = queues_page([a_job("deploy-<b>x</b>-1", "failed")])
    assert "<script>" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&#34;&#39;" in page
    # The job's link and retry button quote its id.
    assert "href='/admin/queues/jobs/deploy-%3Cb%3Ex%3C/b%3E-1'" in page
    assert "action='/admin/queues/jobs/deploy-%3Cb%3Ex%3C/b%3E-1/retry'" in page


def test_markup_in_a_job_is_escaped_on_its_detail() -> None:
    job = a_job("j1", "failed")
    page = render("admin/job.html", title="Job <i>j1</i>", job=job, data=json.dumps(job["data"]))
    assert "<script>" not in page and "<i>" not in page
    # The customer, the step, the data (twice), the attempt's worker and its error.
    assert page.count("&lt;script&gt;") == 6
    assert "Attempts" in page and "retry this job" in page


def test_every_form_carries_the_csrf_token() -> None:
    page = queues_page([a_job("j1", "failed")])
    forms = re.findall(r"<form method='post' action='([^']+)'>", page)
    tokens = re.findall(r"name='csrf' value='([0-9a-f]+)'", page)
    assert forms == ["/admin/queues/clean", "/admin/queues/jobs/j1/retry"]
    assert tokens == [TOKEN, TOKEN]


def test_an_empty_state_says_so_and_offers_no_clean() -> None:
    page = queues_page([], state="waiting")
    assert "no jobs" in page and "<form" not in page


def test_unknown_states_are_refused_naming_the_field() -> None:
    assert known_state("failed", FINISHED) == "failed"
    with pytest.raises(InvalidRequest) as refused:
        known_state("<bogus>", VIEW_STATES)
    assert refused.value.fields == [{"field": "state", "reason": "unknown"}]


def test_times_show_in_utc_or_not_at_all() -> None:
    assert when(1_767_323_045_000) == "2026-01-02 03:04:05"
    assert when(None) == ""
