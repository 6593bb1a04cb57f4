"""``iotistic simulate``: devices publishing realistic BME688 readings to a customer's
instance, signed in as the customer: registered by hand through the API and publishing the
native format (``--format native``), or registering themselves with a provisioning key and
publishing as the original Iotistic agent does (``--format original``)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
from pathlib import Path

from services.cli.environment import console, running_http_url


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``simulate``'s arguments."""
    simulate = subparsers.add_parser(
        "simulate", help="devices publishing realistic BME688 readings to a customer's instance"
    )
    simulate.add_argument("--customer", required=True, help="the customer id (checked at sign-in)")
    simulate.add_argument("--email", required=True, help="the customer's sign-in email")
    simulate.add_argument(
        "--password", help="the customer's password (default: IOTISTIC_PASSWORD, else asked)"
    )
    simulate.add_argument(
        "--devices", type=int, default=3, help="devices to simulate (default: %(default)s)"
    )
    simulate.add_argument("--rate", default="1/s", help="readings per second in all, e.g. 5/s")
    simulate.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    simulate.add_argument("--url", help="the control plane (default: the running iotistic up)")
    simulate.add_argument(
        "--format",
        choices=("native", "original"),
        default="native",
        help="native: devices added through the API, one reading a message; original: devices "
        "that register themselves with a provisioning key and publish as the original agent "
        "(batches on iot/device/<uuid>/sensor/bme688, remote configuration) "
        "(default: %(default)s)",
    )
    simulate.add_argument(
        "--provisioning-key",
        help="with --format original: the key devices register with (default: IOTISTIC_"
        "PROVISIONING_KEY, else one made for the run and revoked after the registrations)",
    )
    simulate.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``iotistic simulate``: register devices and publish readings until told to stop."""
    from services.instance.simulate import devices_for, publish, session
    from services.instance.simulate_original import (
        CredentialsRefused,
        fleet_devices,
        publish_original,
    )

    rate = float(str(args.rate).removesuffix("/s"))
    if rate <= 0 or args.devices < 1:
        console.print("[red]--rate and --devices must be positive[/red]")
        return 2
    url = args.url or running_http_url(args) or "http://127.0.0.1:8080"
    password = args.password or os.environ.get("IOTISTIC_PASSWORD") or getpass.getpass()
    key = args.provisioning_key or os.environ.get("IOTISTIC_PROVISIONING_KEY") or None

    async def go() -> int:
        customer_id, token, instance_url = await session(url, args.email, password)
        if customer_id != args.customer:
            raise SystemExit(f"{args.email} is customer {customer_id}, not {args.customer}")
        store = Path(args.data_dir) / "simulate" / f"{customer_id}.json"
        if args.format == "original":
            fleet = await fleet_devices(instance_url, token, args.devices, store, key)
            console.print(
                f"simulating {len(fleet)} provisioned devices (original format) at {rate:g} "
                f"readings/s in all; live at {instance_url}"
            )
            return await publish_original(fleet, rate, args.duration)
        devices = await devices_for(instance_url, token, args.devices, store)
        console.print(
            f"simulating {len(devices)} devices at {rate:g} readings/s in all; "
            f"live at {instance_url}"
        )
        return await publish(devices, rate, args.duration)

    try:
        sent = asyncio.run(go())
    except CredentialsRefused as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    console.print(f"sent {sent} readings")
    return 0
