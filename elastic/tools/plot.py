"""A PNG timeline of a run: loss with reshards and crashes marked, workers and layout over time,
and how long each reshard or recovery took. Reads a run directory (see ``elastic.tools.metrics``).
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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    steps, events = read_run(run_dir)
    if not steps:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty; the run recorded no steps")
    out = Path(out) if out else Path(run_dir) / "timeline.png"
    fig, (ax_loss, ax_workers, ax_cost) = plt.subplots(3, 1, figsize=(11, 9), height_ratios=[3, 1.4, 1.6])
    xs = [s["step"] for s in steps]
    ax_loss.plot(xs, [s["loss"] for s in steps], color="black", lw=1.2, label="training loss")
    seen = set()
    for e in events:
        if e["kind"] not in MARKS:
            continue
        color, label = MARKS[e["kind"]]
        ax_loss.axvline(e["step"], color=color, ls="--" if e["kind"] == RecordKind.RESHARD else "-", lw=1, alpha=0.7,
                        label=label if label and label not in seen else None)
        seen.add(label)
        if e["kind"] in TIMED:
            text = e.get("new") or e.get("text", "").split("now ")[-1].split(" on")[0]
            ax_loss.annotate(text, (e["step"], ax_loss.get_ylim()[1]), rotation=90, va="top", ha="right",
                             fontsize=7, color=color)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{Path(run_dir).name}: loss, reshards and crashes")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_workers.step(xs, [s["workers"] for s in steps], where="post", color="tab:green")
    ax_workers.set_ylabel("workers")
    ax_workers.set_ylim(0, max(s["workers"] for s in steps) + 1)
    previous = None
    for s in steps:
        if s["layout"] != previous:
            ax_workers.annotate(s["layout"], (s["step"], s["workers"]), xytext=(2, 4), textcoords="offset points",
                                fontsize=7)
            previous = s["layout"]
    ax_workers.set_xlabel("step")
    costs = [e for e in events if e["kind"] in TIMED and "seconds" in e]
    if costs:
        labels = [f"step {e['step']}\n{e['kind']}" for e in costs]
        ax_cost.bar(range(len(costs)), [e["seconds"] for e in costs],
                    color=["tab:blue" if e["kind"] == RecordKind.RESHARD else "tab:red" for e in costs])
        ax_cost.set_xticks(range(len(costs)), labels, fontsize=7)
        for i, e in enumerate(costs):
            ax_cost.annotate(f"{e['seconds']:.2f} s", (i, e["seconds"]), ha="center", va="bottom", fontsize=7)
    else:
        ax_cost.text(0.5, 0.5, "no reshards or recoveries", ha="center", va="center", transform=ax_cost.transAxes)
    ax_cost.set_ylabel("seconds")
    ax_cost.set_title("reshard (blue) and recovery (red) durations", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
