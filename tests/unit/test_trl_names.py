"""TRL's and PEFT's names in config files and flags, honest defaults, and the run's recorded config.toml.

The runs here are only built (``plan_run``), never started: a config is a pure function of the
command, and what a run records is what it was built from. One real run through the command line,
with a TRL YAML and its config.toml read back, is in ``tests/integration/test_job_submit.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
import torch

from launch.cli import help_config, main, parser
from launch.run_config import plan_run, write_record


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A model folder with only its config.json (a byte vocabulary, so no tokenizer is needed to build configs)."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("qwen2")
    Qwen2Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return path


def plan(*argv):
    return plan_run(parser().parse_args(["train", *map(str, argv)]))


def yaml_file(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_trl_sft_yaml_sets_our_fields(tmp_path, base, chats):
    path = yaml_file(tmp_path, f"""
model_name_or_path: {base}
dataset_name: {chats}
learning_rate: 1.0e-4
max_length: 64
max_steps: 7
warmup_ratio: 0.3
lr_scheduler_type: cosine
per_device_train_batch_size: 2
gradient_accumulation_steps: 3
seed: 5
adam_beta2: 0.98
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
report_to: none
logging_steps: 10
gradient_checkpointing: true
bf16: false
""")
    p = plan("--recipe", "lora", "--workers", "2", "--config", path)
    cfg = p.cfg
    assert (cfg.optim.lr, cfg.data.seq_len, cfg.train.steps, cfg.train.seed) == (1e-4, 64, 7, 5)
    assert cfg.train.global_batch == 2 * 3 * 2  # per device x accumulation x workers
    assert (cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.beta2) == (3, 0.0, 0.98)  # ceil(0.3 x 7)
    assert plan("--model", "tiny", "--max_steps", "40").cfg.optim.warmup_steps == 2  # the recipe's steps // 20
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (8, 16, ("q_proj", "v_proj"))
    assert cfg.train.init_from == str(base) and cfg.data.dataset == str(chats)
    assert p.inert == ["report_to", "logging_steps", "gradient_checkpointing", "bf16"]


def test_a_trl_grpo_yaml_sets_our_fields(tmp_path, base):
    path = yaml_file(tmp_path, f"""
model_name_or_path: {base}
use_peft: false
learning_rate: 3.0e-6
num_generations: 4
max_completion_length: 16
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
temperature: 0.7
beta: 0.04
epsilon_high: 0.28
loss_type: grpo
scale_rewards: false
reward_funcs: [tests.helpers:trl_style_reward, tests.helpers:trl_style_bonus]
reward_weights: [1.0, 0.5]
log_completions: true
""")
    cfg = plan("--recipe", "grpo", "--workers", "2", "--config", path).cfg
    g = cfg.section("grpo")
    assert cfg.lora is None and cfg.optim.lr == 3e-6  # use_peft false: the whole model trains
    assert (g.num_generations, g.max_new_tokens, g.temperature, g.beta, g.epsilon_high) == (4, 16, 0.7, 0.04, 0.28)
    assert (g.loss_type, g.scale_rewards) == ("grpo", "none")
    assert g.reward_funcs == "tests.helpers:trl_style_reward,tests.helpers:trl_style_bonus"
    assert g.reward_weights == "1.0,0.5"
    assert cfg.train.global_batch == 4 * 2 * 2 // 4  # TRL's batch counts completions: 16 of them, 4 prompts


def test_trl_names_work_as_flags_and_ours_win(base):
    cfg = plan("--recipe", "grpo", "--workers", "2", "--model_name_or_path", base, "--learning_rate", "2e-6",
               "--num_generations", "2", "--max_completion_length", "5", "--lora_r", "4",
               "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2").cfg
    g = cfg.section("grpo")
    assert (cfg.optim.lr, g.num_generations, g.max_new_tokens, cfg.lora.r) == (2e-6, 2, 5, 4)
    assert cfg.train.init_from == str(base) and cfg.train.global_batch == 3 * 2 * 2 // 2
    assert plan("--lora_target_modules", "all-linear", "--lora_r", "2").cfg.lora.targets[-1] == "down_proj"
    both = plan("--learning_rate", "0.1", "--optim.lr", "0.2", "--per_device_train_batch_size", "2",
                "--train.global_batch", "5").cfg
    assert both.optim.lr == 0.2 and both.train.global_batch == 5


@pytest.mark.parametrize("text, words", [
    ("learning_rat: 0.1\nvllm_mode: colocate\n", "'learning_rat', 'vllm_mode' are not implemented here"),
    ("use_vllm: true\n", "use_vllm=True is not implemented here (sampling runs in the workers' own model)"),
    ("lr_scheduler_type: linear\n", "lr_scheduler_type='linear' is not implemented here"),
    ("num_train_epochs: 3\n", "num_train_epochs=3 is not implemented here"),
    ("num_generations: 3\nper_device_train_batch_size: 2\n", "not a multiple of num_generations=3"),
])
def test_a_name_we_do_not_implement_is_refused_by_name(tmp_path, capsys, text, words):
    path = yaml_file(tmp_path, text)
    assert main(["train", "--recipe", "grpo", "--workers", "1", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], err


def cases(base, chats):
    """A command per recipe and kind of defaults: toy presets, real-model ones, full fine-tuning."""
    return {
        "pretrain": ["--model", "tiny", "--steps", "9", "--lora.r", "4", "--lora.targets", "q_proj,v_proj"],
        "grpo toy": ["--recipe", "grpo", "--grpo.epsilon_high", "0.3", "--train.dtype", "float64"],
        "grpo real": ["--recipe", "grpo", "--base", base, "--workers", "2"],
        "lora real": ["--recipe", "lora", "--base", base, "--data", chats, "--workers", "3"],
        "lora full": ["--recipe", "lora", "--base", base, "--data", chats, "--use_peft", "false"],
    }


def test_config_toml_builds_the_same_config(tmp_path, base, chats):
    for name, argv in cases(base, chats).items():
        run_dir = tmp_path / name.replace(" ", "-")
        first = plan(*argv)
        write_record(run_dir, first, ["elastic", "train", *map(str, argv)])
        again = plan("--config", run_dir / "config.toml")
        assert again.cfg == first.cfg, name
        assert (again.recipe.name, again.recipe_args.peft) == (first.recipe.name, first.recipe_args.peft), name
        assert (run_dir / "command.txt").read_text().startswith("elastic train"), name
    changed = plan("--config", tmp_path / "pretrain" / "config.toml", "--steps", "3", "--workers", "2").cfg
    assert (changed.train.steps, changed.runtime.workers) == (3, 2)  # the command's own flags win over the file


def test_help_shows_what_the_run_records(tmp_path, base, chats):
    """For every recipe, each --section.field's help gives the value the run writes to its config.toml."""
    import tomllib

    for name, argv in cases(base, chats).items():
        argv = ["train", *map(str, argv)]
        shown, note = help_config([*argv, "--help"])
        assert shown is not None, note
        run_dir = tmp_path / name.replace(" ", "-")
        write_record(run_dir, plan_run(parser().parse_args(argv)), argv)
        recorded = tomllib.loads((run_dir / "config.toml").read_text())
        top = parser(shown=shown)
        train = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
        helps = {a.dest: a.help for a in train._actions}
        checked = 0
        for section, values in recorded.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                want = ",".join(value) if isinstance(value, list) else repr(value)
                assert helps[f"cfg__{section}__{key}"].endswith(f"(default: {want})"), (name, section, key)
                checked += 1
        assert checked > 40, name
        assert helps["trl__learning_rate"] == f"--optim.lr (default: {recorded['optim']['lr']!r})", name


def test_real_model_defaults_and_toy_presets(base, chats):
    from launch.run_config import chosen_lines

    lora = plan("--recipe", "lora", "--base", base, "--data", chats, "--workers", "3", "--learning_rate", "1e-4")
    assert (lora.cfg.data.seq_len, lora.cfg.train.global_batch, lora.cfg.train.dtype) == (512, 24, "float32")
    assert lora.cfg.optim.beta2 == 0.999 and lora.cfg.lora.dropout == 0.05
    lines = "\n".join(chosen_lines(lora))
    assert "data.seq_len = 512" in lines and "mixed precision" in lines
    assert "optim.lr" not in lines  # the user chose it
    assert plan("--recipe", "lora", "--base", base, "--data", chats, "--use_peft", "false").cfg.optim.lr == 2e-5
    assert plan("--recipe", "lora", "--base", base, "--data", chats).cfg.optim.lr == 2e-4
    grpo = plan("--recipe", "grpo", "--base", base).cfg
    g = grpo.section("grpo")
    assert (grpo.optim.lr, g.max_new_tokens, g.num_generations, grpo.train.global_batch) == (1e-6, 256, 8, 4)
    fewer = plan("--recipe", "grpo", "--base", base, "--num_generations", "4", "--workers", "2").cfg
    assert fewer.train.global_batch == 8 * 2 // 4  # still TRL's 8 completions per worker
    for argv in (["--recipe", "grpo"], ["--model", "tiny"], ["--recipe", "lora", "--base", base]):
        toy = chosen_lines(plan(*argv))
        assert len(toy) == 1 and toy[0].startswith("toy preset: "), toy
    assert plan("--recipe", "grpo").cfg.optim.lr == 1e-3  # the toy presets keep their numbers


def test_reward_functions_get_trls_shapes_and_may_be_async():
    from elastic.recipes.grpo.prompts import score_batch
    from elastic.recipes.grpo.rewards import accuracy

    seen = {}

    def user(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [float(len(c[0]["content"]) if isinstance(c, list) else len(c)) for c in completions]

    async def later(prompts, completions, answer, **kwargs):
        await asyncio.sleep(0)
        return [1.0 if i == 0 else None for i in range(len(answer))]

    chat = [{"role": "user", "content": "3+4?"}]
    rewards = score_batch([("user", user), ("later", later), ("accuracy", accuracy)], [chat, "3+4="], ["7", "77"],
                          {"answer": ["7", "7"]}, [[1], [1, 1]])
    assert seen["completions"] == [[{"role": "assistant", "content": "7"}], "77"]  # as TRL hands them over
    assert torch.equal(rewards, torch.tensor([1 + 1 + 1, 2 + 0 + 0], dtype=torch.float64))  # accuracy reads text
