"""The command line: typed flags for every config field, TOML files, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_config, main, parser

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_every_config_field_is_a_typed_flag(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 7\nglobal_batch = 12\n[optim]\nlr = 0.01\n[model]\ndim = 48\nn_heads = 4\n')
    args = parser().parse_args(["train", "--recipe", "pretrain", "--model", "tiny", "--config", str(toml),
                                "--optim.lr", "0.02", "--runtime.cpus_per_worker", "0.5", "--layout", "dp=2"])
    cfg, layout, _ = build_config(args)
    assert (cfg.train.steps, cfg.train.global_batch, cfg.model.dim) == (7, 12, 48)  # from the file
    assert cfg.optim.lr == 0.02 and cfg.runtime.cpus_per_worker == 0.5  # flags win over the file
    assert str(layout) == "dp=2"
    lora = parser().parse_args(["train", "--recipe", "pretrain", "--lora.r", "4", "--lora.targets", "q_proj,v_proj"])
    cfg, _, _ = build_config(lora)
    assert cfg.lora.r == 4 and cfg.lora.targets == ("q_proj", "v_proj")


def test_help_explains_each_field(capsys):
    with pytest.raises(SystemExit) as exit_:  # in this process: a subprocess only paid the imports again
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--optim.warmup_steps INT" in out and "linear warmup steps" in out
    assert "--grpo.rho_plus FLOAT" in out


@pytest.mark.parametrize("args, words", [
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["train", "--layout", "dp=2,xx=2"], "malformed layout part 'xx=2'"),
    (["train", "--layout", "tp=3", "--model", "tiny"], "tp=3 does not divide n_heads=4"),
    (["train", "--address", "127.0.0.1:1"], "nothing is listening at 127.0.0.1:1"),
    (["train", "--recipe", "lora", "--base", "/nonexistent"], "the lora recipe needs --base FOLDER"),
    (["train", "--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
    (["train", "--optim.lr", "-1"], "optim.lr=-1.0 must be > 0"),
    (["events", "status", "--job", "x", "--address", "127.0.0.1:1"], "nothing is listening"),
    (["events", "explode", "--job", "x"], "unknown events action 'explode'"),
    (["plot", "/nonexistent-run"], "has no metrics.jsonl"),
])
def test_bad_input_is_one_clear_line(args, words, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err


def test_as_a_process_the_exit_code_is_nonzero():
    out = run_cli("train", "--recipe", "nope")
    assert out.returncode == 2 and out.stderr.strip().startswith("elastic: error: unknown recipe")


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown recipe"):
        main(["--debug", "train", "--recipe", "nope"])


def test_debug_shows_the_workers_tracebacks(monkeypatch, capsys):
    from elastic.driver.group import WorkerFailure

    def failing(args):
        raise WorkerFailure({}, {3: "TaskFailed: boom"}, {3: "Traceback (most recent call last):\n  in run\nboom"})

    import launch.cli

    monkeypatch.setattr(launch.cli, "cmd_plot", failing)
    assert main(["plot", "x"]) == 2 and "Traceback" not in capsys.readouterr().err  # one line without --debug
    with pytest.raises(WorkerFailure):
        main(["--debug", "plot", "x"])
    assert "--- worker 3 ---\nTraceback (most recent call last):" in capsys.readouterr().err


def test_the_operator_commands_import_no_torch():
    """`elastic events` and `elastic plot` answer in about a second: they never import torch."""
    code = ("import sys; from launch.cli import main; main(['events', 'status', '--job', 'x', '--address', "
            "'127.0.0.1:1']); main(['plot', '/nonexistent-run']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
