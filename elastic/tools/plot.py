"""A PNG timeline of a run: loss (and the held-out ``eval_loss`` when the run evaluated) with reshards and crashes
marked, the reward curve of a GRPO run (``reward``, with ``reward_std`` as a band and ``eval_reward`` when
present) marked alike, workers and layout over time, and how long each reshard or recovery took. Reads a run
directory (see ``elastic.tools.metrics``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from elastic.core.records import RecordKind  # noqa: E402
from elastic.tools.metrics import read_run  # noqa: E402

MARKS = {RecordKind.RESHARD: ("tab:blue", "reshard"), RecordKind.RECOVERED: ("tab:red", "crash recovered"),
         RecordKind.FAILURE: ("tab:red", None), RecordKind.DRAINED: ("tab:purple", "drain"),
         RecordKind.PAUSE: ("tab:gray", "pause")}
TIMED = (RecordKind.RESHARD, RecordKind.RECOVERED)  # entries with a duration, drawn in the bottom panel


def series(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry a number under ``key`` (evaluations come every K steps only)."""
    rows = [s for s in steps if isinstance(s.get(key), (int, float))]
    return [s["step"] for s in rows], [float(s[key]) for s in rows]


def mark_events(ax, events: list[dict], annotate: bool) -> None:
    """A vertical line per reshard, recovery, drain or pause (one legend entry per kind); ``annotate``: the new
    layout written along the lines of timed entries."""
    seen = set()
    for e in events:
        if e["kind"] not in MARKS:
            continue
        color, label = MARKS[e["kind"]]
        ax.axvline(e["step"], color=color, ls="--" if e["kind"] == RecordKind.RESHARD else "-", lw=1, alpha=0.7,
                   label=label if label and label not in seen else None)
        seen.add(label)
        if annotate and e["kind"] in TIMED:
            text = e.get("new") or e.get("text", "").split("now ")[-1].split(" on")[0]
            ax.annotate(text, (e["step"], ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=7,
                        color=color)


def _draw_loss(ax, steps: list[dict], events: list[dict], name: str) -> None:
    xs, ys = series(steps, "loss")
    if xs:
        ax.plot(xs, ys, color="black", lw=1.2, label="training loss")
    ex, ey = series(steps, "eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange", lw=1.2, ms=4, label="eval loss (held-out rows)")
    mark_events(ax, events, annotate=True)
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss, reshards and crashes")
    ax.legend(loc="upper right", fontsize=8)


def _draw_reward(ax, steps: list[dict], events: list[dict]) -> None:
    xs, ys = series(steps, "reward")
    ax.plot(xs, ys, color="tab:green", lw=1.2, label="reward (mean over completions)")
    sx, sd = series(steps, "reward_std")
    if sx == xs:
        ax.fill_between(xs, [y - d for y, d in zip(ys, sd, strict=True)], [y + d for y, d in zip(ys, sd, strict=True)],
                        color="tab:green", alpha=0.15, label="reward ± std")
    ex, ey = series(steps, "eval_reward")
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange", lw=1.2, ms=4, label="eval reward (held-out, greedy)")
    mark_events(ax, events, annotate=False)
    ax.set_ylabel("reward")
    ax.legend(loc="lower right", fontsize=8)


def _draw_workers(ax, steps: list[dict]) -> None:
    xs = [s["step"] for s in steps]
    ax.step(xs, [s.get("workers", 0) for s in steps], where="post", color="tab:green")
    ax.set_ylabel("workers")
    ax.set_ylim(0, max(s.get("workers", 0) for s in steps) + 1)
    previous = None
    for s in steps:
        if "layout" in s and s["layout"] != previous:
            ax.annotate(s["layout"], (s["step"], s["workers"]), xytext=(2, 4), textcoords="offset points",
                        fontsize=7)
            previous = s["layout"]
    ax.set_xlabel("step")


def _draw_costs(ax, events: list[dict]) -> None:
    costs = [e for e in events if e["kind"] in TIMED and "seconds" in e]
    if costs:
        labels = [f"step {e['step']}\n{e['kind']}" for e in costs]
        ax.bar(range(len(costs)), [e["seconds"] for e in costs],
               color=["tab:blue" if e["kind"] == RecordKind.RESHARD else "tab:red" for e in costs])
        ax.set_xticks(range(len(costs)), labels, fontsize=7)
        for i, e in enumerate(costs):
            ax.annotate(f"{e['seconds']:.2f} s", (i, e["seconds"]), ha="center", va="bottom", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no reshards or recoveries", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("seconds")
    ax.set_title("reshard (blue) and recovery (red) durations", fontsize=9)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    steps, events = read_run(run_dir)
    if not steps:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty; the run recorded no steps")
    out = Path(out) if out else Path(run_dir) / "timeline.png"
    rewarded = bool(series(steps, "reward")[0])
    panels = ["loss", "reward", "workers", "cost"] if rewarded else ["loss", "workers", "cost"]
    ratios = {"loss": 3, "reward": 2.4, "workers": 1.4, "cost": 1.6}
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 9 + 2.4 * rewarded),
                             height_ratios=[ratios[p] for p in panels])
    ax = dict(zip(panels, axes, strict=True))
    _draw_loss(ax["loss"], steps, events, Path(run_dir).name)
    if rewarded:
        _draw_reward(ax["reward"], steps, events)
    _draw_workers(ax["workers"], steps)
    _draw_costs(ax["cost"], events)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
