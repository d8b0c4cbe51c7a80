"""The ``elastic`` command: train a recipe, talk to a running job, sample from a model, plot a run.

    elastic train --recipe pretrain --workers 4 --layout dp=2,tp=2 --steps 300
    elastic train --recipe lora --base runs/pretrain/base --workers 4 --layout auto
    elastic train --recipe lora --base MODEL_DIR --data chats.jsonl
    elastic generate --base MODEL_DIR --adapter runs/NAME/adapter "What is 2 + 3?"
    elastic events --job NAME status | add-workers N | drain WORKER | relayout dp=2,tp=2 | pause | resume | stop
    elastic plot runs/NAME
    elastic export runs/NAME/checkpoints --out policy     # a checkpoint's model as an adapter or HF folder

Without ``--address`` training starts an embedded local Ray; inside ``ray job submit`` it attaches
to the job's cluster (RAY_ADDRESS). ``elastic events`` attaches to the job's cluster: ``--address``,
else RAY_ADDRESS, else the Ray instance running on this machine. Bad input gives one clear line and
exit code 2; ``--debug`` shows the traceback (workers' tracebacks included) instead.

``elastic events`` and ``elastic plot`` import no torch, so an operator's call answers in seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from launch.export import add_parser as add_export_parser
from launch.generate import add_parser as add_generate_parser

EVENTS = ("status", "add-workers", "drain", "relayout", "pause", "resume", "stop")
RECIPE_NAMES = ("pretrain", "lora", "grpo")  # the registry's names, without importing it (it imports torch)


class UsageError(ValueError):
    """Bad command-line input: printed as one line."""


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """Fail at once, clearly, if nothing listens at ``address`` (Ray would otherwise retry for minutes)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    target = address.split("://")[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError:
        raise UsageError(f"nothing is listening at {address}; start a cluster with `ray start --head` "
                         "(and export RAY_AUTH_MODE=token), or drop --address to run locally") from None


def build_config(args: argparse.Namespace):
    """(config, layout or None, recipe) from the recipe's defaults, ``--config`` and the flags
    (``launch/run_config.py``)."""
    from launch.run_config import plan_run

    plan = plan_run(args)
    return plan.cfg, plan.layout, plan.recipe


def cmd_train(args: argparse.Namespace) -> int:
    from launch.run_config import chosen_lines, plan_run, write_record

    plan = plan_run(args)
    cfg, layout, recipe = plan.cfg, plan.layout, plan.recipe
    if args.address:
        check_address(args.address)
    from elastic.control.controller import Controller
    from elastic.driver.connect import connect_ray
    from elastic.tools.storage import persist, run_storage
    from launch.jobs import finished, job_name, refuse_twin

    job = job_name(args.recipe, cfg, args.job_name)
    storage = run_storage(job, args.storage_path, args.run_dir)
    run_dir = storage.local
    done = finished(run_dir, cfg.train.steps)
    if done is not None:
        print(f"job {job!r} already finished: {done['last_step']} steps, final loss {done.get('final_loss')}; its "
              f"outputs are in {storage.shown}. To train again, give another --job-name (or remove that folder).")
        return 0
    connect_ray(args.address)
    refuse_twin(job)
    write_record(run_dir, plan)
    print(f"job {job!r}: {args.recipe}, {cfg.model.num_params() / 1e6:.1f}M parameters, "
          f"{cfg.runtime.workers} workers, layout {layout or 'auto'}; outputs in {storage.shown}")
    where = f" --address {args.address}" if args.address else ""
    print(f"talk to it with: elastic events --job {job} status{where}")
    for line in chosen_lines(plan):
        print(line)
    print(f"its configuration: {run_dir / 'config.toml'} (rerun it with --config)")
    workload = recipe.workload(cfg) if recipe.workload else None
    # The workers write the model into the run folder at the end; the driver never gathers the state.
    controller = Controller(cfg, workload=workload, job_name=job, run_dir=str(run_dir),
                            progress=not args.no_progress, gather_tensors=False, export_dir=str(run_dir))
    if controller.resume_from is not None:
        print(f"resuming from {controller.resume_from} (the newest checkpoint of this job)")
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    last = result.history[-1] if result.history else None
    print(f"done: {len(result.history)} steps in {result.seconds:.0f} s, final loss "
          f"{last.loss if last else float('nan'):.4f}, {len(result.reshards)} reshards, "
          f"{len(result.recoveries)} recoveries; plot it with: elastic plot {run_dir}")
    for line in controller.policy.memory.lines():
        print(line)
    for line in recipe.finish(cfg, result, run_dir, workload) if recipe.finish else []:
        print(line)
    persist(storage)
    if storage.remote:
        print(f"outputs copied to {storage.remote}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    need = {"add-workers": "a worker count", "drain": "a worker id", "relayout": "a layout like dp=2,tp=2"}
    if args.action in need and args.value is None:
        raise UsageError(f"`elastic events {args.action}` needs {need[args.action]}")
    if args.address:
        check_address(args.address)
    from elastic.control.client import JobClient
    from elastic.driver.connect import connect_ray

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        connect_ray(address, check=False)
    except ConnectionError as err:
        if address != "auto":
            raise
        raise UsageError("no Ray cluster is running on this machine; pass --address HOST:PORT of the job's "
                         "cluster (the job prints the exact command when it starts)") from err
    client = JobClient(args.job)
    if args.action == "status":
        status = client.status()
        last = status.get("last_reshard")
        print(f"job {args.job}: {status.get('state')} at step {status.get('step')}/{status.get('steps')}, "
              f"layout {status.get('layout')} on workers {status.get('workers')}, loss {status.get('loss')}")
        if last:
            print(f"last reshard: {last['from']} -> {last['to']} ({last['reason']}) at step {last['step']} "
                  f"in {last['seconds']:.2f} s, {last['bytes'] / 1e6:.1f} MB")
        return 0
    if args.action == "add-workers":
        answer = client.add_workers(int(args.value))
    elif args.action == "drain":
        answer = client.drain(int(args.value))
    elif args.action == "relayout":
        answer = client.relayout(args.value)
    else:
        answer = getattr(client, args.action)()
    print(answer)
    return 1 if answer.startswith(("refused", "no decision")) else 0  # a refused or unanswered request fails


def cmd_plot(args: argparse.Namespace) -> int:
    from elastic.tools.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def add_train_parser(sub, config_flags: bool, shown, note: str) -> None:
    """``elastic train``: the common choices, then (``config_flags``) a flag per config field."""
    raw = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="run a training recipe", formatter_class=raw,
                           description="Train a recipe. Every config field can be set with --<section>.<field> (or "
                                       "its TRL name); flags override --config, which overrides the recipe's "
                                       f"defaults. {note}")
    if config_flags:
        from elastic.recipes.registry import RECIPES

        recipes = "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items())
    else:
        recipes = ", ".join(RECIPE_NAMES)
    train.add_argument("--recipe", help=f"{recipes} (default: the --config file's, else pretrain)")
    train.add_argument("--workers", type=int, help="worker processes (Ray actors) to start (default: 4, or the "
                                                   "--config file's)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    train.add_argument("--model", help="model preset for pretrain: tiny, mini, small, 25m, 100m")
    train.add_argument("--base", "--model_name_or_path",
                       help="Hugging Face model folder to fine-tune: Llama, Qwen2, Qwen3 or Mistral (lora, grpo)")
    train.add_argument("--data", "--dataset_name",
                       help="a .json/.jsonl/.parquet file in a TRL format, tokenized by --base's tokenizer: text, "
                            "prompt+completion or messages (lora); prompts (grpo)")
    train.add_argument("--config", help="a TOML or YAML file: [model], [train], ... sections and/or TRL's and PEFT's "
                                        "names (SFTConfig, GRPOConfig, LoraConfig), e.g. a run's config.toml or "
                                        "TRL's own YAML")
    train.add_argument("--address", help="Ray cluster HOST:PORT (default: RAY_ADDRESS, else a local Ray)")
    train.add_argument("--job-name", help="the job's name: its run folder STORAGE_PATH/<name> and its control actor "
                                          "(for `elastic events`); default: the recipe and a digest of the "
                                          "configuration, so that the same command again resumes the same job")
    train.add_argument("--storage-path", help="where runs are kept, a folder or a pyarrow.fs URI (s3://, gs://, "
                                              "...); the run goes to STORAGE_PATH/<job> (default: Ray Train's "
                                              "~/ray_results, or ELASTIC_STORAGE_PATH)")
    train.add_argument("--run-dir", "--output_dir", help="this run's folder exactly (overrides --storage-path)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    if config_flags:
        from launch.args import add_config_flags

        add_config_flags(train, *(shown or (None, "")))
    train.set_defaults(handler=cmd_train)


def parser(config_flags: bool = True, shown=None, note: str = "") -> argparse.ArgumentParser:
    """The argument parser; ``config_flags`` adds a flag per config field (it imports every recipe). ``shown``:
    the config whose values the flags' help gives as defaults (``help_config``); ``note`` says whose they are."""
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="elastic", description=__doc__, formatter_class=raw)
    top.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = top.add_subparsers(dest="command", required=True)
    add_train_parser(sub, config_flags, shown, note)

    events = sub.add_parser("events", help="talk to a running job")
    events.add_argument("action", help=f"one of {', '.join(EVENTS)}")
    events.add_argument("value", nargs="?", help="worker count, worker id or layout, as the action needs")
    events.add_argument("--job", required=True, help="the job's name (printed when it started)")
    events.add_argument("--address", help="Ray cluster HOST:PORT (default: RAY_ADDRESS, else this machine's Ray)")
    events.set_defaults(handler=cmd_events)

    add_generate_parser(sub)
    add_export_parser(sub)

    plot = sub.add_parser("plot", help="write a PNG timeline of a run directory")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/timeline.png)")
    plot.set_defaults(handler=cmd_plot)
    return top


def help_config(argv: list[str]):
    """((config, recipe) or None, note) for ``elastic train ... --help``: the config the same command without
    --help would run, so the help shows the values it will use."""
    from launch.run_config import plan_run

    rest = [a for a in argv if a not in ("-h", "--help")]
    try:
        args, _ = parser(config_flags=True).parse_known_args(rest)
        plan = plan_run(args)
    except (Exception, SystemExit) as err:  # the help must print whatever the other arguments are
        return None, f"Defaults shown are the fields' own: this command's run could not be built ({err})."
    return (plan.cfg, args.recipe), (f"Defaults shown are those this command runs with (--recipe {args.recipe}"
                                     f"{' --base ' + args.base if args.base else ''}); put --recipe, --base, --data "
                                     "or --config before --help to see another run's.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    shown, note = (None, "")
    if command == "train" and ("-h" in argv or "--help" in argv):
        shown, note = help_config(argv)
    args = parser(config_flags=command == "train", shown=shown, note=note).parse_args(argv)
    if args.command == "events" and args.action not in EVENTS:
        print(f"elastic: error: unknown events action {args.action!r}; choose one of {', '.join(EVENTS)}",
              file=sys.stderr)
        return 2
    from elastic.tools.progress import configure_logging

    configure_logging(debug=args.debug)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("elastic: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, unless --debug
        if args.debug:
            detail = getattr(err, "traceback_text", None)
            if detail is not None and detail():
                print(detail(), file=sys.stderr)
            raise
        print(f"elastic: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
