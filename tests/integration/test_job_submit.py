"""`ray job submit` against a real head node started with `ray start --head` (token auth).

Its own cluster (``background.start_head``: free ports, a private temp dir, started at collection beside
the unit tier) runs an `elastic train --address` driver that is SIGKILLed mid-run, then the same command
submitted as a Ray job through JobSubmissionClient, which resumes the lost run: the test polls it to SUCCEEDED,
checks its logs and outputs against the reference weights, and stops the cluster. (A separate short submitted
job was merged into that resume: one job start fewer.)
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration import background

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head_node():
    node = background.head()  # started at collection (tests/conftest.py), beside the unit tier
    try:
        yield f"http://127.0.0.1:{node.dashboard}", dict(node.env, ELASTIC_TEST_GCS_PORT=str(node.port))
    finally:
        background.stop_head()
        assert not background.cluster_processes(node.temp), "the test cluster left processes behind"


@pytest.mark.timeout(120)
def test_a_driver_that_imported_ray_first_still_connects(head_node):
    """Ray reads its auth mode at import: connect_ray must switch a process that imported ray without
    RAY_AUTH_MODE to token auth, or the connection retries silently for minutes."""
    address, env = head_node
    gcs = address.replace("http://", "").rsplit(":", 1)[0] + ":" + env["ELASTIC_TEST_GCS_PORT"]
    code = ("import ray; from elastic.driver.connect import connect_ray; "
            f"connect_ray({gcs!r}); print(int(ray.cluster_resources()['CPU']))")
    clean = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("2"), out.stderr[-2000:]


def submit(client, entrypoint: str, env) -> str:
    """Submit ``entrypoint`` as a Ray job with this repository as its working directory; the head's job agent
    comes up a few seconds after `ray start` returns, so "No available agent" is waited out."""
    for _ in range(60):
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "runs", ".git", "bench/out", "*.png"],
                             "env_vars": {"PATH": env["PATH"], "PYTHONUNBUFFERED": "1"}})
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            time.sleep(1)
    raise AssertionError("the job agent never came up")


def wait_for_job(client, job: str, limit_s: float) -> tuple[str, str]:
    """(final status, logs) of ``job``."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + limit_s
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(0.25)
        status = client.get_job_status(job)
    return status, client.get_job_logs(job)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_lost_driver_is_resumed_by_submitting_the_same_command_as_a_job(head_node, tmp_path, monkeypatch):
    """The driver (`elastic train --address`) is SIGKILLed mid-run; its workers go with it; the same command again,
    submitted through Ray's JobSubmissionClient, resumes from the newest checkpoint the job wrote into its run
    folder by default, succeeds, and ends at the reference weights. Part of the
    command is a TRL YAML; the config.toml the run records, read back with --config, gives the run's config, and
    the reference weights are computed from that."""
    import re

    from elastic.core import checkpoint as ckpt
    from elastic.driver import connect
    from elastic.model.specs import training_specs
    from launch.cli import build_config, main, parser
    from tests.helpers import worst_state_err
    from tests.reference import train_reference

    address, env = head_node
    env = dict(env, PYTHONUNBUFFERED="1")
    gcs = address.replace("http://", "").rsplit(":", 1)[0] + ":" + env["ELASTIC_TEST_GCS_PORT"]
    # TRL's names: 20 steps, 4 sequences per worker, 16 tokens. The kill comes once step 10's checkpoint is on
    # disk (polled every 0.05 s), so the second run resumes mid-run and trains the remaining steps itself.
    trl = tmp_path / "trl.yaml"
    trl.write_text("max_steps: 20\nper_device_train_batch_size: 4\nmax_length: 16\nreport_to: none\n")
    args = ["train", "--recipe", "pretrain", "--model", "tiny", "--config", str(trl), "--workers", "2",
            "--layout", "dp=2", "--train.dtype", "float64", "--data.max_corpus_bytes", "200000",
            "--runtime.cpus_per_worker", "0.25", "--checkpoint-every", "5",
            "--storage-path", str(tmp_path), "--no-progress"]
    command = [sys.executable, "-m", "launch", *args, "--address", gcs]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, deadline, started = [], time.monotonic() + 180, time.monotonic()
    for line in first.stdout:  # the run folder's name comes from the configuration: find it in the output
        output.append(line)
        if "outputs in" in line or time.monotonic() > deadline:
            break
    run_dir = Path(line.rsplit("outputs in ", 1)[1].strip())
    while time.monotonic() < deadline and first.poll() is None:
        try:
            if ckpt.latest(run_dir / "checkpoints").name >= "step_000010":
                break
        except ckpt.CheckpointError:
            pass
        time.sleep(0.05)
    first.kill()  # SIGKILL: the driver gets no chance to clean anything up
    killed = time.monotonic()
    output += first.stdout.readlines()
    first.wait()
    pids = [int(p) for p in re.findall(r"\d+", next(l for l in output if "started workers" in l).split("pids")[1])]
    while any(alive(p) for p in pids) and time.monotonic() < killed + 30:
        time.sleep(0.1)
    outlived = time.monotonic() - killed
    assert not any(alive(p) for p in pids), f"workers {pids} outlived their driver by 30 s"
    print(f"\nthe lost driver's workers were gone {outlived:.1f} s after it ({killed - started:.0f} s into the run)")
    # The same command again, submitted as a Ray job this time (what `ray job submit -- elastic train ...` does;
    # the entrypoint finds the cluster through the job's RAY_ADDRESS), as a user whose own driver died would.
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, again_at = JobSubmissionClient(address), time.monotonic()
    status, logs = wait_for_job(client, submit(client, "elastic " + shlex.join(args), env), 240)
    print(f"the same command again, as a Ray job, took {time.monotonic() - again_at:.0f} s")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert f"resuming from {run_dir / 'checkpoints'}" in logs, logs[-3000:]
    assert f"outputs in {run_dir}" in logs and f"elastic events --job {run_dir.name} status" in logs, logs[-3000:]
    assert "done: 10 steps" in logs and "at step 10 on dp=2 on workers [0, 1]" in logs, logs[-3000:]  # the rest
    assert (run_dir / "metrics.jsonl").is_file()
    # The workers reported their steps' peak RSS, and the job printed the memory model's prediction beside it.
    assert "memory on dp=2: a step's peak predicted " in logs, logs[-3000:]
    measured = json.loads((run_dir / "summary.json").read_text())["memory"]
    assert [m["layout"] for m in measured] == ["dp=2"] and measured[0]["measured_gb"] > 0, measured
    cfg = build_config(parser().parse_args(args))[0]
    assert (cfg.train.steps, cfg.train.global_batch, cfg.data.seq_len) == (20, 8, 16)
    assert "accepted, changes nothing here: report_to" in logs
    recorded = build_config(parser().parse_args(["train", "--config", str(run_dir / "config.toml")]))[0]
    assert recorded == cfg
    cfg = recorded  # the reference below trains from what the run recorded
    assert (run_dir / "command.txt").read_text().split()[1:3] == ["train", "--recipe"]
    final = ckpt.open_checkpoint(ckpt.latest(run_dir / "checkpoints"), cfg, training_specs(cfg))
    assert final.step == 20
    wanted = {s.name: tuple((0, n) for n in s.shape) for s in training_specs(cfg)}
    err, name = worst_state_err(ckpt.read_boxes(final, wanted, torch.float64), train_reference(cfg).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    # The same command a third time, in this process (no interpreter and torch import to pay for): a finished
    # job says so and stops before it reaches Ray at all.
    monkeypatch.setattr(connect, "connect_ray", lambda *a, **k: pytest.fail("a finished job connected to Ray"))
    with contextlib.redirect_stdout(io.StringIO()) as again:
        assert main([*args, "--address", gcs]) == 0
    assert "already finished: 20 steps" in again.getvalue(), again.getvalue()[-2000:]


@pytest.mark.timeout(120)
def test_an_auth_mode_that_does_not_match_the_cluster_fails_in_one_line(head_node):
    """The user's RAY_AUTH_MODE is respected; against a token cluster, "disabled" fails at once, naming it."""
    address, env = head_node
    gcs = address.replace("http://", "").rsplit(":", 1)[0] + ":" + env["ELASTIC_TEST_GCS_PORT"]
    wrong = dict(env, RAY_AUTH_MODE="disabled")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "launch", "train", "--recipe", "pretrain", "--model", "tiny",
                          "--steps", "2", "--workers", "1", "--address", gcs, "--no-progress",
                          "--storage-path", "/tmp/elastic-auth-test"],
                         cwd=ROOT, env=wrong, capture_output=True, text=True, timeout=110)
    lines = [line for line in out.stderr.splitlines() if line.startswith("elastic: error")]
    assert out.returncode == 2 and len(lines) == 1 and "RAY_AUTH_MODE=disabled" in lines[0], out.stderr[-2000:]
    print(f"\nrefused in {time.monotonic() - started:.1f} s: {lines[0][:160]}")
