"""Figure 2: cumulative completed HITs against hours since the batch was published.

One panel per country (the countries with most completions; the rest share
an "Others" panel), one line per batch, labelled with its reward. Drawn on a
bare ``matplotlib.figure.Figure`` (the Agg renderer, no pyplot state), so it
works headless and leaves nothing behind.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .report import UNKNOWN, Curve, Report, SpeedTests

MAX_PANELS = 6


def _merge(curves: list[Curve], country: str) -> list[Curve]:
    """Combine several countries' curves into one per batch."""
    steps: dict[str | None, list[tuple[float, int]]] = defaultdict(list)
    rewards: dict[str | None, str | None] = {}
    for curve in curves:
        rewards[curve.batch] = curve.reward
        previous = 0
        for hour, count in zip(curve.hours, curve.completed, strict=True):
            steps[curve.batch].append((hour, count - previous))
            previous = count
    merged = []
    for batch, increments in steps.items():
        increments.sort()
        hours: list[float] = []
        completed: list[int] = []
        total = 0
        for hour, step in increments:
            total += step
            hours.append(hour)
            completed.append(total)
        merged.append(Curve(country, batch, rewards[batch], hours, completed))
    return merged


def panels(report: Report) -> list[tuple[str, list[Curve]]]:
    """(title, curves) per panel, busiest country first."""
    by_country: dict[str, list[Curve]] = defaultdict(list)
    for curve in report.curves:
        by_country[curve.country].append(curve)
    ranked = sorted(
        by_country,
        key=lambda c: (c == UNKNOWN, -sum(k.completed[-1] for k in by_country[c]), c),
    )
    if len(ranked) > MAX_PANELS:
        shown, rest = ranked[: MAX_PANELS - 1], ranked[MAX_PANELS - 1 :]
    else:
        shown, rest = ranked, []
    result = [(report.name(country), by_country[country]) for country in shown]
    if rest:
        others = [curve for country in rest for curve in by_country[country]]
        result.append((f"Others ({len(rest)} countries)", _merge(others, "others")))
    return result


def _label(curve: Curve, same_reward: bool) -> str:
    reward = f"${curve.reward}" if curve.reward is not None else "reward unknown"
    if same_reward:
        return f"{reward} ({curve.batch or 'no batch'})"
    return reward


def write_png(report: Report, path: Path) -> None:
    shown = panels(report)
    count = max(1, len(shown))
    columns = min(2, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(6.4 * columns, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(shown):
            ax.set_visible(bool(shown) is False and index == 0)
            if not shown and index == 0:
                ax.text(0.5, 0.5, "No completed HIT", ha="center", va="center")
                ax.set_axis_off()
            continue
        title, curves = shown[index]
        curves = sorted(curves, key=lambda c: (_reward_value(c.reward), c.batch or ""))
        rewards = [c.reward for c in curves]
        end = max(c.hours[-1] for c in curves)
        for curve in curves:
            # Flat to the panel's last completion: a batch that stopped early shows so.
            ax.plot(
                [0.0, *curve.hours, end],
                [0, *curve.completed, curve.completed[-1]],
                drawstyle="steps-post",
                label=_label(curve, rewards.count(curve.reward) > 1),
            )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("hours since the batch was published")
        ax.set_ylabel("completed HITs")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(title="reward")
    figure.suptitle("Completed HITs by compensation")
    figure.savefig(path, format="png", dpi=100)


def _reward_value(reward: str | None) -> float:
    try:
        return float(reward) if reward is not None else math.inf
    except ValueError:
        return math.inf


MAX_VANTAGE_POINTS = 40


def write_speedtests_png(speedtests: SpeedTests, path: Path) -> None:
    """Speeds by tool at each vantage point: download above, upload below.

    One column per vantage point (worker and IPv4 address), one marker per
    tool, on a log scale (speeds span orders of magnitude); the points of one
    column spread apart as far as the tools disagree (§4.1's "wide variance").
    The vantage points with the widest download spread come first.
    """
    points = sorted(
        speedtests.vantage_points,
        key=lambda v: (-(v.download_cv or 0.0), v.worker_id or "", v.ipv4),
    )[:MAX_VANTAGE_POINTS]
    tests = [(t.test, t.name) for t in speedtests.tools]
    figure = Figure(figsize=(max(6.4, 0.45 * len(points) + 3), 7.2), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True, squeeze=False)[:, 0]
    markers = "os^vD<>ph*"
    # Each tool a little to the side of the column, so equal speeds stay visible.
    width = min(0.5, 0.1 * len(tests))
    for ax, direction in zip(axes, ("download", "upload"), strict=True):
        for index, (test, name) in enumerate(tests):
            offset = (index / (len(tests) - 1) - 0.5) * width if len(tests) > 1 else 0.0
            xs, ys = [], []
            for x, point in enumerate(points):
                for speed in point.speeds:
                    if speed.test == test:
                        xs.append(x + offset)
                        ys.append(getattr(speed, f"{direction}_mbps"))
            ax.scatter(xs, ys, label=name, marker=markers[index % len(markers)], alpha=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{direction} (Mbit/s)")
        ax.grid(True, alpha=0.3, which="both")
    axes[0].legend(title="speed test", fontsize="small")
    axes[-1].set_xticks(
        range(len(points)),
        [f"{p.worker_id or 'direct'}\n{p.ipv4}" for p in points],
        rotation=60,
        ha="right",
        fontsize="x-small",
    )
    shown = "" if len(points) == len(speedtests.vantage_points) else f" (widest {len(points)})"
    figure.suptitle(f"Speed tests by vantage point{shown}")
    figure.savefig(path, format="png", dpi=100)
