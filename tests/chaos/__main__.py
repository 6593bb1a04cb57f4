"""`./dev chaos [--short] [--only NAME] [--keep]`: run the experiments, print a verdict each.

Exits 0 when every check of every experiment run held, 1 otherwise (2 for bad arguments).
Each experiment is bounded in time; Ctrl-C or SIGTERM stops the run and every process and
folder it made.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from types import FrameType

from tests.chaos.checks import Check
from tests.chaos.experiments import EXPERIMENTS, Experiment, Options, Outcome

# Far above what an experiment takes (a few minutes with everything converging): only a hang
# in the harness itself would reach it.
EXPERIMENT_TIMEOUT = 600.0
SHORT_EXPERIMENT_TIMEOUT = 300.0


def chosen(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Experiment]:
    if args.only:
        names = {n for item in args.only for n in item.split(",") if n}
        known = {e.name for e in EXPERIMENTS}
        if names - known:
            parser.error(f"unknown experiment {', '.join(sorted(names - known))}; see --list")
        return [e for e in EXPERIMENTS if e.name in names]
    return [e for e in EXPERIMENTS if e.short == args.short]


async def run_one(experiment: Experiment, keep: bool) -> Outcome:
    options = Options(keep=keep, short=experiment.short)
    timeout = SHORT_EXPERIMENT_TIMEOUT if experiment.short else EXPERIMENT_TIMEOUT
    started = time.monotonic()
    try:
        outcome = await asyncio.wait_for(experiment.run(options), timeout)
    except TimeoutError:
        outcome = Outcome(experiment.name)
        outcome.checks.append(_error(f"the experiment did not finish within {timeout:.0f} s"))
    except Exception as exc:  # reported as the experiment's failure; the run goes on
        outcome = Outcome(experiment.name)
        outcome.checks.append(_error(f"{type(exc).__name__}: {exc}"))
    outcome.seconds = time.monotonic() - started
    return outcome


def _error(message: str) -> Check:
    return Check("experiment ran to its end", False, message)


def report(outcome: Outcome) -> None:
    if outcome.skipped is not None:
        print(f"SKIP {outcome.name}: {outcome.skipped}", flush=True)
        return
    verdict = "PASS" if outcome.ok else "FAIL"
    failed = outcome.failed()
    summary = f"; failed: {', '.join(c.name for c in failed)}" if failed else ""
    print(
        f"{verdict} {outcome.name} ({outcome.seconds:.0f} s): "
        f"{len(outcome.checks) - len(failed)}/{len(outcome.checks)} checks held{summary}",
        flush=True,
    )
    for figure in outcome.figures:
        print(f"   {figure}")
    for check in failed:
        print(f"   FAILED {check.name}: {check.detail}")
    sys.stdout.flush()


async def run(experiments: list[Experiment], keep: bool) -> list[Outcome]:
    outcomes = []
    for experiment in experiments:
        print(f"== {experiment.name}: {experiment.what}", flush=True)
        outcome = await run_one(experiment, keep)
        report(outcome)
        outcomes.append(outcome)
    return outcomes


def _terminated(signum: int, frame: FrameType | None) -> None:
    # The same path as Ctrl-C: asyncio.run cancels the run and every clean-up runs.
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the short subset CI runs")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these")
    parser.add_argument("--keep", action="store_true", help="keep the data folders and logs")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    args = parser.parse_args()
    if args.list:
        for e in EXPERIMENTS:
            print(f"{e.name:<20} {'(short) ' if e.short else ''}{e.what}")
        return
    experiments = chosen(args, parser)
    signal.signal(signal.SIGTERM, _terminated)
    started = time.monotonic()
    try:
        outcomes = asyncio.run(run(experiments, args.keep))
    except KeyboardInterrupt:
        print("interrupted: everything the run started has been stopped", file=sys.stderr)
        sys.exit(130)
    failed = [o.name for o in outcomes if not o.ok and o.skipped is None]
    skipped = [o.name for o in outcomes if o.skipped is not None]
    print(
        f"chaos: {len(outcomes) - len(failed) - len(skipped)} passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "")
        + f" in {time.monotonic() - started:.0f} s"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
