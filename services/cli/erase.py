"""``iotistic erase <customer_id>``: erase a closed customer's personal data, through signup's
admin route (``POST /api/customers/{id}/erase``) on the running platform."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import httpx

from libs.config import ConfigError
from services.cli.environment import console, running_http_url


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``erase``'s arguments."""
    erase = subparsers.add_parser(
        "erase",
        help="erase a closed customer's personal data (destroys their data key; the events stay)",
    )
    erase.add_argument("customer_id", help="the customer to erase (their account must be closed)")
    erase.add_argument(
        "--url", help="the control plane's URL (default: the running `iotistic up`'s)"
    )
    erase.set_defaults(func=cmd_erase)


def admin_token(args: argparse.Namespace) -> str:
    """``ADMIN_TOKEN``, else the one `iotistic up` generated into the data folder."""
    token = os.environ.get("ADMIN_TOKEN", "").strip()
    kept = Path(args.data_dir) / "secrets" / "admin-token"
    if not token and kept.is_file():
        token = kept.read_text().strip()
    if not token:
        raise ConfigError(f"ADMIN_TOKEN not set, and no {kept}: the erasure route is admin only")
    return token


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase the customer; prints the answer as JSON. Exit 1 when refused (open, unknown)."""
    url = args.url or running_http_url(args) or "http://127.0.0.1:8080"
    try:
        answer = httpx.post(
            f"{url.rstrip('/')}/api/customers/{args.customer_id}/erase",
            headers={"Authorization": f"Bearer {admin_token(args)}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        console.print(f"[red]erase:[/red] {url} did not answer: {exc}")
        return 1
    if answer.status_code != 200:
        try:
            message = answer.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = answer.text[:300]
        console.print(f"[red]erase refused ({answer.status_code}):[/red] {message}")
        return 1
    print(json.dumps(answer.json(), indent=2))
    return 0
