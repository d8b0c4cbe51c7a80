"""``elastic generate`` on a file of prompts (``launch/generate.py``, ``model/inference.py``), in-process.

A random Qwen2 folder with a ChatML tokenizer: prompts in TRL's formats (texts, conversations, a
``messages`` row) come out as JSON lines in order; greedy completions equal transformers' own
``generate`` on the chat-templated prompt; sampling is seeded per prompt, so the batch size does not
change a completion and another seed does.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from elastic.tools.tiny_hf import write_model, write_tokenizer
from launch.cli import main

ROWS = [{"prompt": "What is 2 + 3?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"prompt": "def add(a, b):"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_qwen2")
    write_model(path, "qwen2")
    write_tokenizer(path)
    return path


def run(folder, tmp_path, name, *flags):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / name
    assert main(["generate", "--base", str(folder), "--prompts", str(prompts), "--out", str(out),
                 "--max_new_tokens", "6", *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_greedy_completions_equal_transformers_generate_in_order(folder, tmp_path):
    got = run(folder, tmp_path, "greedy.jsonl", "--batch_size", "3")
    assert [g["prompt"] for g in got] == ["What is 2 + 3?", ROWS[1]["prompt"], ROWS[2]["messages"][:1],
                                          "def add(a, b):"]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    for row in got:
        messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:]
        assert row["completion"] == tok.decode(new, skip_special_tokens=True), row


def test_sampling_is_seeded_per_prompt_whatever_the_batch(folder, tmp_path, capsys):
    flags = ("--temperature", "1.0", "--top_p", "0.95")
    one = run(folder, tmp_path, "b1.jsonl", "--batch_size", "1", *flags)
    four = run(folder, tmp_path, "b4.jsonl", "--batch_size", "4", *flags)
    other = run(folder, tmp_path, "s1.jsonl", "--batch_size", "4", "--seed", "1", *flags)
    assert one == four and one != other
    text = tmp_path / "one.txt"
    text.write_text("What is 2 + 3?\n\n")
    capsys.readouterr()  # the "wrote ..." lines of the runs above
    assert main(["generate", "--base", str(folder), "--prompts", str(text), "--max_new_tokens", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "What is 2 + 3?"  # JSONL on stdout without --out


def test_bad_input_is_one_line(folder, tmp_path, capsys):
    assert main(["generate", "--base", str(folder)]) == 2
    assert "give one prompt, or --prompts FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    assert main(["generate", "--base", str(folder), "--prompts", str(bad)]) == 2
    assert "neither 'prompt'" in capsys.readouterr().err
