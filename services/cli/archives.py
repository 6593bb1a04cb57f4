"""``iotistic export`` and ``iotistic import``: a customer's everything, as one archive, out of
their instance and into a new one (the instance's ``GET /api/export`` and ``POST /api/import``),
signed in as the customer.

The session comes from ``--token`` (or ``IOTISTIC_TOKEN``), or from signing in with ``--email``
on the control plane (``--url``), which also tells the instance's URL when ``--instance`` is not
given. An export is written to a temporary file next to ``--output`` and renamed once whole and
checked (the manifest's sha256 of every file), so a cut connection never leaves a file that
looks like an archive.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from services.cli.environment import console, running_http_url

CHUNK = 1 << 20


def _session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", help="the instance's URL (default: the signed-in one's)")
    parser.add_argument("--token", help="the customer's session token (default: IOTISTIC_TOKEN)")
    parser.add_argument("--email", help="sign in with this email instead of a token")
    parser.add_argument("--password", help="with --email (default: IOTISTIC_PASSWORD, else asked)")
    parser.add_argument("--url", help="the control plane (default: the running iotistic up)")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``export``'s and ``import``'s arguments."""
    export = subparsers.add_parser(
        "export", help="everything a customer owns, from their instance, as one archive (tar)"
    )
    _session_arguments(export)
    export.add_argument("--output", "-o", help="the archive (default: iotistic-<time>.tar)")
    export.add_argument(
        "--dead-letters", action="store_true", help="include the rejected payloads too"
    )
    export.set_defaults(func=cmd_export)
    restore = subparsers.add_parser(
        "import", help="restore an export archive into a new (empty) instance"
    )
    _session_arguments(restore)
    restore.add_argument("archive", help="the archive `iotistic export` wrote")
    restore.set_defaults(func=cmd_import)


async def _signed_in(args: argparse.Namespace) -> tuple[str, str]:
    """The instance's URL and the session token."""
    token = args.token or os.environ.get("IOTISTIC_TOKEN")
    instance = args.instance
    if args.email:
        from services.instance.simulate import session

        password = args.password or os.environ.get("IOTISTIC_PASSWORD") or getpass.getpass()
        url = args.url or running_http_url(args) or "http://127.0.0.1:8080"
        _, token, signed_in_instance = await session(url, args.email, password)
        instance = instance or signed_in_instance
    if not token or not instance:
        raise SystemExit("give --instance and --token (or IOTISTIC_TOKEN), or sign in with --email")
    return str(instance).rstrip("/"), token


def cmd_export(args: argparse.Namespace) -> int:
    """``iotistic export``: stream the archive to a file, check it, and say what it holds."""
    from services.instance.archive import ArchiveRefused, check_archive

    async def go() -> int:
        instance, token = await _signed_in(args)
        output = Path(args.output or time.strftime("iotistic-%Y%m%dT%H%M%S.tar"))
        partial = output.with_name(output.name + ".partial")
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(60, read=600)) as client,
            client.stream(
                "GET",
                f"{instance}/api/export",
                params={"dead_letters": "true"} if args.dead_letters else None,
                headers={"Authorization": f"Bearer {token}"},
            ) as answer,
        ):
            if answer.status_code != 200:
                said = (await answer.aread()).decode(errors="replace")
                console.print(f"[red]export refused:[/red] {answer.status_code} {said}")
                return 1
            with partial.open("wb") as out:
                async for chunk in answer.aiter_bytes(CHUNK):
                    out.write(chunk)
        try:
            checked = await asyncio.to_thread(check_archive, str(partial))
        except ArchiveRefused as exc:
            console.print(f"[red]the archive came incomplete or damaged:[/red] {exc}")
            return 1
        partial.rename(output)
        counts = ", ".join(f"{k} {v:,}" for k, v in checked.manifest["counts"].items())
        console.print(f"{output}: {len(checked.files)} files, checked; {counts}")
        return 0

    return asyncio.run(go())


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def cmd_import(args: argparse.Namespace) -> int:
    """``iotistic import``: send the archive, print the devices' new ids and credentials."""
    path = Path(args.archive)
    if not path.is_file():
        console.print(f"[red]no archive at {path}[/red]")
        return 2

    async def go() -> int:
        instance, token = await _signed_in(args)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=3600)) as client:
            answer = await client.post(
                f"{instance}/api/import",
                content=_chunks(path),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-tar"},
            )
        if answer.status_code not in (200, 201):
            console.print(f"[red]import refused:[/red] {answer.status_code} {answer.text}")
            return 1
        body = answer.json()
        console.print_json(data=body)
        return 0

    return asyncio.run(go())
