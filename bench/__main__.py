"""`python -m bench [--quick] [--runs N] [--only NAME ...]`: run the scenarios.

Full mode repeats every scenario (three runs by default) and reports the
median; quick mode runs each once, small, and fails (exit 1) only when a
figure falls below half of its goal (its quick goal where the goal is not
met yet, see `Check`), so CI catches a regression without a flaky timed
test. Both end with one line of JSON holding the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import results as report
from bench.scenarios import MODULES, load
from bench.stack import BenchStack

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small and fast, for CI")
    parser.add_argument("--runs", type=int, help="repeats per scenario (default 3, quick 1)")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="just these scenarios")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    chosen = args.only or list(MODULES)

    medians: list[report.ScenarioResult] = []
    started = time.monotonic()
    with BenchStack() as stack:
        for name in chosen:
            scenario = load(name)
            repeats = []
            for attempt in range(runs):
                stack.clear()
                print(f"bench: {name} run {attempt + 1}/{runs}", file=sys.stderr, flush=True)
                repeats.append(scenario.run(stack, quick=args.quick))
            result = report.median_result(repeats)
            medians.append(result)
            for check, value, attainment in report.verdicts(result, quick=args.quick):
                print(
                    f"bench: {check.figure} = {value:,.4g}{check.unit} "
                    f"(goal {check.describe(quick=args.quick)}, {attainment:.0%})",
                    file=sys.stderr,
                    flush=True,
                )
    base = report.write(medians, args.out, quick=args.quick, runs=runs)
    print(report.markdown(medians, quick=args.quick, runs=runs), file=sys.stderr)
    print(
        f"bench: wrote {base}.{{json,md,png}} in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    failed = [
        f"{check.figure} at {attainment:.0%} of its goal"
        for result in medians
        for check, _value, attainment in report.verdicts(result, quick=args.quick)
        if attainment < 0.5
    ]
    print(json.dumps(report.summary(medians)))
    if args.quick and failed:
        print("bench: below half of goal: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
