"""A user's LoRA run: a random Qwen2 folder (q/k/v biases, tied embeddings, a padded vocabulary) with
its own BPE tokenizer and ChatML template, fine-tuned on a JSONL of chats with loss on assistant
turns only, resharded live, equal to the single-process PEFT reference (float64, 1e-9), and exported
as an adapter that ``PeftModel.from_pretrained`` loads with the same logits (1e-4), which the
adapters move by at least 100 times that.

The export is the workers' (``driver/exporter.py``): at the end the controller has them write the adapter and
a merged folder split into several files (written by more than one worker, from dp=2,tp=2 shards) while the
driver receives no tensor bytes (a gather would receive the state, about 4 times the largest tensor); the
merged folder loads in transformers with the adapter's logits, and the adapter file equals the reference's
adapters. The fallback for workers that cannot see the folder (the driver writes, one received tensor at a
time) writes the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.core.config import LoraConfig, RuntimeConfig
from elastic.core.layout import Layout
from elastic.driver import exporter
from elastic.model import export
from elastic.model.peft_io import PREFIX
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
def test_lora_on_a_qwen2_folder_with_chats(pool, tmp_path, monkeypatch):
    base, _ = write_folder(tmp_path / "qwen2", "qwen2-tied", vocab_size=448)
    write_tokenizer(base)  # 400 tokens: the model's spare rows are never emitted
    chats = write_chats(tmp_path / "chats.jsonl")
    cfg = lora_config(base, steps=STEPS, global_batch=8, dtype="float64", data=str(chats))
    cfg = cfg.replace(lora=LoraConfig(r=4, alpha=8.0, export="both"),
                      runtime=RuntimeConfig(workers=4, collective_timeout_s=60))
    assert cfg.data.tokenizer == str(base) and cfg.model.family == "qwen2"
    ref = train_reference(cfg)
    script = ScriptedEvents({3: [Relayout(reason="test", layout=Layout.parse("dp=2,tp=2"))]})
    cfg = with_control(cfg, layout="fsdp=4", prepare_wait_steps=0)
    controller = Controller(cfg, group=pool, sources=[script], progress=False, export_dir=str(tmp_path / "run"))
    tokenised = pool.run({w: TokenisedFiles() for w in pool.warm()})
    monkeypatch.setattr(export, "MAX_SHARD_SIZE", 40_000)  # the merged folder in several files, several writers
    try:
        result = controller.run()
        # The fallback, on the same final state: every worker said blind, the driver writes what they send.
        monkeypatch.setattr(exporter, "_blind", lambda group, workers, folder: {w: "elsewhere" for w in workers})
        via_driver = exporter.export_from_workers(pool, cfg, tmp_path / "via-driver")
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
    adapter, merged = tmp_path / "run" / "adapter", tmp_path / "run" / "merged"
    assert str(adapter) in lines[0]
    check_the_export(result, via_driver, ref, merged)
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
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float64).eval()
    with torch.no_grad():
        folded = merged_model(input_ids=x).logits
    assert ((theirs - folded).abs().max() / theirs.abs().max()).item() <= 1e-4


def check_the_export(result, via_driver, ref, merged) -> None:
    """The workers wrote the files (several of them), the driver received no tensor, the adapter file is the
    reference's adapters, and the driver's fallback wrote the same bytes having received each tensor once."""
    report, state_bytes = result.export, sum(t.nbytes for t in result.tensors.values())
    assert report.driver_bytes <= report.largest_bytes, f"the driver received {report.driver_bytes} bytes"
    # A gather (the old export) would receive the whole state: about 4 times the largest tensor (the embedding).
    assert state_bytes >= 3 * report.largest_bytes, (state_bytes, report.largest_bytes)
    assert len({w for w in report.writers.values()}) >= 2 and None not in report.writers.values(), report.writers
    assert len(list(merged.glob("model-*.safetensors"))) >= 3 and not (merged / "model.safetensors").exists()
    written = load_file(str(merged.parent / "adapter" / "adapter_model.safetensors"))
    expected = {PREFIX + k: v for k, v in ref.tensors.items() if ".lora_" in k and "::" not in k}
    assert written.keys() == expected.keys()
    err = max(((written[k] - v).abs().max() / v.abs().max()).item() for k, v in expected.items())
    assert err <= 1e-9, err
    assert set(via_driver.writers.values()) == {None} and via_driver.driver_bytes == via_driver.written_bytes
    for file in report.writers:
        mirror = via_driver.folders[Path(file).parent.name] / Path(file).name
        assert Path(file).read_bytes() == mirror.read_bytes(), file


def LlamaStageWithAdapters(cfg, tensors):  # noqa: N802 (reads as the model it returns)
    from elastic.model.llama import LlamaStage
    from elastic.model.lora import apply_lora

    model = apply_lora(LlamaStage(cfg.model).double(), cfg.lora)
    model.load_state_dict({k: v for k, v in tensors.items() if "::" not in k}, strict=True)
    return model.eval()
