"""What a scenario reports, and how a run is written down.

A scenario returns a `ScenarioResult`: its figures, its ceiling measured
in the same run, the goals (`Check`) those figures are held to, and
optionally a load curve for the plot. `python -m bench` repeats each
scenario and keeps the median of every figure; `write` puts the run under
bench/results/ as JSON, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: render straight to PNG
import matplotlib.pyplot as plt


@dataclass
class Check:
    """One goal: `figure` must be at least (or at most) `goal`.

    `quick_goal` is what quick mode holds the figure to instead, where the
    goal itself is not met yet: what main measures now, so that CI catches
    a regression without failing on a known gap (the README lists them).
    `full_only` checks are not made in quick mode at all (their load is
    not part of it).
    """

    figure: str
    goal: float
    higher_is_better: bool
    unit: str = ""
    quick_goal: float | None = None
    full_only: bool = False

    def target(self, *, quick: bool) -> float:
        return self.quick_goal if quick and self.quick_goal is not None else self.goal

    def attainment(self, value: float, *, quick: bool = False) -> float:
        """Value over goal, as a fraction of the goal met (1.0 and above: met)."""
        goal = self.target(quick=quick)
        if self.higher_is_better:
            return value / goal if goal else float("inf")
        return goal / value if value > 0 else float("inf")

    def describe(self, *, quick: bool = False) -> str:
        sign = "≥" if self.higher_is_better else "<"
        return f"{sign} {self.target(quick=quick):g}{self.unit}"


@dataclass
class CurvePoint:
    """One step of offered load, for the plot."""

    offered_per_s: float
    achieved_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: dict[str, float]
    checks: list[Check]
    ceiling: dict[str, float] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median_result(runs: list[ScenarioResult]) -> ScenarioResult:
    """The median of every figure and ceiling over repeated runs (the curve of the median run)."""
    first = runs[0]
    figures = {key: statistics.median(run.figures[key] for run in runs) for key in first.figures}
    ceiling = {key: statistics.median(run.ceiling[key] for run in runs) for key in first.ceiling}
    notes = [note for run in runs for note in run.notes]
    middle = sorted(runs, key=lambda run: next(iter(run.figures.values()), 0.0))[len(runs) // 2]
    return ScenarioResult(
        name=first.name,
        title=first.title,
        figures=figures,
        checks=first.checks,
        ceiling=ceiling,
        curve=middle.curve,
        notes=list(dict.fromkeys(notes)),
    )


def verdicts(result: ScenarioResult, *, quick: bool = False) -> list[tuple[Check, float, float]]:
    """(check, value, attainment) for each goal of a scenario (quick: its quick goals)."""
    return [
        (
            check,
            result.figures[check.figure],
            check.attainment(result.figures[check.figure], quick=quick),
        )
        for check in result.checks
        if not (quick and check.full_only)
    ]


def markdown(results: list[ScenarioResult], *, quick: bool, runs: int) -> str:
    mode = "quick" if quick else "full"
    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {mode} mode, median of {runs} "
        f"run(s), {platform.machine()} with {_cores()} cores.",
        "",
        "| scenario | figure | measured | goal | ceiling (same run) | met |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        ceiling = ", ".join(f"{key} {value:,.4g}" for key, value in result.ceiling.items()) or "-"
        for check, value, attainment in verdicts(result, quick=quick):
            met = "yes" if attainment >= 1 else f"no ({attainment:.0%} of goal)"
            lines.append(
                f"| {result.title} | `{check.figure}` | {value:,.4g}{check.unit} | "
                f"{check.describe(quick=quick)} | {ceiling} | {met} |"
            )
    notes = [f"- {result.title}: {note}" for result in results for note in result.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def summary(results: list[ScenarioResult]) -> dict[str, float]:
    """Every figure of every scenario, flat: the harness's last line of output."""
    figures: dict[str, float] = {}
    for result in results:
        figures.update({key: round(value, 3) for key, value in result.figures.items()})
    return figures


def write(results: list[ScenarioResult], folder: Path, *, quick: bool, runs: int) -> Path:
    """bench/results/<stamp>[-quick].{json,md,png}, and latest.* beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "")
    document: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "runs": runs,
        "machine": {
            "arch": platform.machine(),
            "cores": _cores(),
            "python": platform.python_version(),
        },
        "summary": summary(results),
        "scenarios": [asdict(result) for result in results],
    }
    base = folder / stamp
    base.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(results, quick=quick, runs=runs))
    plot(results, base.with_suffix(".png"))
    latest = "latest-quick" if quick else "latest"
    for suffix in (".json", ".md", ".png"):
        source = base.with_suffix(suffix)
        if source.exists():
            (folder / f"{latest}{suffix}").write_bytes(source.read_bytes())
    return base


def plot(results: list[ScenarioResult], path: Path) -> None:
    """Throughput and latency percentiles against offered load, one panel per curve."""
    curves = [result for result in results if result.curve]
    if not curves:
        return
    figure, axes = plt.subplots(len(curves), 1, figsize=(8, 4 * len(curves)), squeeze=False)
    for row, result in enumerate(curves):
        axis = axes[row][0]
        offered = [point.offered_per_s for point in result.curve]
        axis.plot(offered, [p.achieved_per_s for p in result.curve], "o-", label="achieved /s")
        axis.plot(offered, offered, ":", color="grey", label="offered /s")
        axis.set_xlabel("offered load (requests/s)")
        axis.set_ylabel("requests/s")
        axis.set_title(result.title)
        latency = axis.twinx()
        latency.plot(
            offered, [p.p50_ms for p in result.curve], "s--", color="tab:green", label="p50 ms"
        )
        latency.plot(
            offered, [p.p99_ms for p in result.curve], "^--", color="tab:red", label="p99 ms"
        )
        latency.set_ylabel("latency (ms)")
        latency.set_yscale("log")
        handles = axis.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
        labels = axis.get_legend_handles_labels()[1] + latency.get_legend_handles_labels()[1]
        axis.legend(handles, labels, loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _cores() -> int:
    return len(os.sched_getaffinity(0))
