"""A user's LoRA run: a random Qwen2 folder (q/k/v biases, tied embeddings, a padded vocabulary) with
its own BPE tokenizer and ChatML template, fine-tuned on a JSONL of chats with loss on assistant
turns only, resharded live, equal to the single-process PEFT reference (float64, 1e-9), and exported
as an adapter that ``PeftModel.from_pretrained`` loads with the same logits (1e-4), which the
adapters move by at least 100 times that.
"""

from __future__ import annotations

import json
import random

import peft
import pytest
import torch
import transformers

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.core.config import LoraConfig, RuntimeConfig
from elastic.core.layout import Layout
from elastic.recipes.lora import RECIPE
from elastic.recipes.lora.recipe import lora_config
from elastic.tools.tiny_hf import write_tokenizer
from tests.helpers import TokenisedFiles, worst_state_err
from tests.reference import train_reference
from tests.unit.test_families import write_folder

STEPS = 6


def write_chats(path, n: int = 40):
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            messages = [{"role": "system", "content": "You add numbers."},
                        {"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.mark.timeout(240)
def test_lora_on_a_qwen2_folder_with_chats(pool, tmp_path):
    base, _ = write_folder(tmp_path / "qwen2", "qwen2-tied", vocab_size=448)
    write_tokenizer(base)  # 400 tokens: the model's spare rows are never emitted
    chats = write_chats(tmp_path / "chats.jsonl")
    cfg = lora_config(base, steps=STEPS, global_batch=8, dtype="float64", data=str(chats))
    cfg = cfg.replace(lora=LoraConfig(r=4, alpha=8.0),
                      runtime=RuntimeConfig(workers=4, collective_timeout_s=60))
    assert cfg.data.tokenizer == str(base) and cfg.model.family == "qwen2"
    ref = train_reference(cfg)
    script = ScriptedEvents({3: [Relayout(reason="test", layout=Layout.parse("dp=2,tp=2"))]})
    cfg = with_control(cfg, layout="fsdp=4", prepare_wait_steps=0)
    controller = Controller(cfg, group=pool, sources=[script], progress=False)
    tokenised = pool.run({w: TokenisedFiles() for w in pool.warm()})
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert [h.layout for h in result.history] == ["fsdp=4"] * 3 + ["dp=2,tp=2"] * 3
    # The chats were tokenised once, before any worker built an engine: no build, first or after the reshard,
    # read the file again (each worker memory-maps the cached rows).
    assert pool.run({w: TokenisedFiles() for w in tokenised}) == tokenised
    err, name = worst_state_err(result.tensors, ref.tensors)
    assert err <= 1e-9, f"{name} rel err {err:.2e}"
    assert ref.losses[-1] < ref.losses[0]

    lines = RECIPE.finish(cfg, result, tmp_path / "run", None)
    adapter = tmp_path / "run" / "adapter"
    assert str(adapter) in lines[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ours = LlamaStageWithAdapters(cfg, result.tensors)
    x = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = model(input_ids=x).logits, ours(x)
        with model.disable_adapter():
            base_logits = model(input_ids=x).logits
    assert ((theirs - mine).abs().max() / theirs.abs().max()).item() <= 1e-4
    # The adapters move the logits far beyond that tolerance, so an export that lost them would fail it.
    moved = ((theirs - base_logits).abs().max() / theirs.abs().max()).item()
    assert moved >= 100 * 1e-4, f"the trained adapters move the logits by only {moved:.1e}"


def LlamaStageWithAdapters(cfg, tensors):  # noqa: N802 (reads as the model it returns)
    from elastic.model.llama import LlamaStage
    from elastic.model.lora import apply_lora

    model = apply_lora(LlamaStage(cfg.model).double(), cfg.lora)
    model.load_state_dict({k: v for k, v in tensors.items() if "::" not in k}, strict=True)
    return model.eval()
