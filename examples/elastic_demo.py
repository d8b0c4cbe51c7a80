"""The elastic demo (`make demo`): a drain, a crash and a scale-out, live, in one training run.

    make demo                                   # or: .venv/bin/python examples/elastic_demo.py

A small Llama-style model pre-trains on Python's standard library on 4 worker processes
(layout dp=2,tp=2) under the controller, on an embedded local Ray. While it trains:
- a worker gets a preemption notice: its shards move off it before it leaves (drain);
- another worker is SIGKILLed from outside: the survivors notice within a second, take the lost
  shards from a replica and carry on (no restart, no disk);
- two workers are added: they warm up in the background, then the job reshards onto them.
It prints a table of what happened and how long each change took, and writes
``runs/demo/timeline.png``. About 80 seconds on a 2-core machine once set up.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from elastic.control.controller import Controller
from elastic.control.events import AddWorkers, Drain
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Done, Running
from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from elastic.driver.connect import connect_ray
from elastic.recipes.pretrain.recipe import complete, load_model, pretrain_config
from elastic.tools.plot import plot_run
from elastic.tools.progress import configure_logging

ROOT = Path(__file__).resolve().parents[1]


def crash_at(controller: Controller, step: int, log: list) -> threading.Thread:
    """SIGKILL a worker's process (by PID, from outside Ray) once the job reaches ``step``."""

    def run():
        while controller.step < step or not isinstance(controller.state, Running):
            if isinstance(controller.state, Done):
                return
            time.sleep(0.01)
        time.sleep(0.05)  # land inside a step
        victim = controller.group.placement.workers[-1]
        log.append((controller.step, victim, controller.group.pid(victim)))
        controller.group.kill(victim)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/demo")
    args = parser.parse_args()
    third = args.steps // 4
    cfg = pretrain_config(model="mini", steps=args.steps, workers=4, global_batch=16, seq_len=96)
    script = ScriptedEvents({third: [Drain(reason="preemption notice for worker 1", worker=1)],
                             3 * third: [AddWorkers(reason="two workers came back", count=2)]})
    configure_logging()
    connect_ray()
    cfg = with_control(cfg, layout=Layout(dp=2, tp=2), objective="use_all", snapshot_every=10)
    controller = Controller(cfg, sources=[script], run_dir=str(args.out), job_name="demo")
    print(f"training a {cfg.model.num_params() / 1e6:.1f}M-parameter model on 4 workers; "
          "talk to it meanwhile with: elastic events --job demo status")
    crashes: list = []
    try:
        controller.start()
        crash_at(controller, 2 * third, crashes)
        result = controller.run_started()
    finally:
        controller.shutdown()

    table = Table(title="What happened")
    for col in ("step", "event", "layout after", "took"):
        table.add_column(col)
    for e in result.events:
        if e["kind"] == RecordKind.RESHARD:
            table.add_row(str(e["step"]), f"reshard ({e['reason']})", e["new"], f"{e['seconds'] * 1000:.0f} ms")
        elif e["kind"] == RecordKind.RECOVERED:
            step, victim, pid = crashes[0] if crashes else ("?", "?", "?")
            table.add_row(str(e["step"]), f"crash of worker {victim} (pid {pid}) recovered from {e['how']}",
                          e["text"].split("now ")[1].split(" on")[0], f"{e['seconds'] * 1000:.0f} ms")
        elif e["kind"] in (RecordKind.DRAINED, RecordKind.SCALE_OUT, RecordKind.WORKERS_READY):
            table.add_row(str(e["step"]), e["text"], "", "")
    Console(width=140).print(table)
    first, last = result.history[0], result.history[-1]
    print(f"loss {first.loss:.3f} -> {last.loss:.3f} over {len(result.history)} steps in {result.seconds:.0f} s; "
          f"final layout {last.layout} on {last.workers} workers; every sample used once: "
          f"{len({i for h in result.history for i in h.samples}) == len(result.history) * cfg.train.global_batch}")
    for text in complete(load_model(cfg, result.tensors), ["def ", "    return "], max_new_tokens=60):
        print("---\n" + text)
    print(f"timeline plot: {plot_run(args.out)}")


if __name__ == "__main__":
    main()
