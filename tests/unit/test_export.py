"""A run's outputs load where users load models (``model/export.py``), built in-process without workers.

From a random Qwen2 folder (with a tokenizer and chat template) and a run state with non-zero adapters:
``AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/adapter)`` finds its base by itself (from another
working directory) and computes our logits; ``lora.export = "both"`` also writes a merged folder that
``AutoModelForCausalLM`` loads with the same logits; a full fine-tune writes an HF folder likewise. Each
folder carries the base's tokenizer.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from elastic.core.config import Config, DataConfig, LoraConfig, TrainConfig
from elastic.model.export import base_model_name, export_model, how_to_sample
from elastic.model.hf import load_hf_model, model_config_of
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.model.safetensors_stream import StreamWriter
from elastic.tools.tiny_hf import write_model, write_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    write_model(folder, "qwen2", tie_word_embeddings=False)
    write_tokenizer(folder)
    return folder


def run_state(cfg: Config, seed: int = 1) -> tuple[dict[str, torch.Tensor], LlamaStage]:
    """A run's full state (with an optimizer entry) whose adapters (or, without LoRA, weights) moved; our model."""
    _, state = load_hf_model(cfg.train.init_from)
    model = LlamaStage(cfg.model)
    model.load_state_dict(state)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or cfg.lora is None:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors["model.norm.weight::exp_avg"] = torch.zeros_like(tensors["model.norm.weight"])  # dropped on export
    return tensors, model.eval()


def config(base, lora: LoraConfig | None) -> Config:
    return Config(model=model_config_of(base), lora=lora, data=DataConfig(dataset="arithmetic", seq_len=16),
                  train=TrainConfig(steps=1, global_batch=2, init_from=str(base)))


def logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-5, err


X = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(5))


def test_adapter_and_merged_load_with_our_logits(tmp_path, base, monkeypatch):
    cfg = config(base, LoraConfig(r=4, alpha=8.0, export="both"))
    tensors, ours = run_state(cfg)
    written = export_model(tmp_path / "run", cfg, tensors)
    assert set(written) == {"adapter", "merged"}
    adapter_cfg = json.loads((written["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base.resolve())
    monkeypatch.chdir(tmp_path)  # the adapter names its base absolutely: no working directory needed
    with torch.no_grad():
        expected = ours(X)
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(written["adapter"])).eval()
        logits_close(expected, auto(input_ids=X).logits)
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(written["merged"])).eval()
        logits_close(expected, merged(input_ids=X).logits)
    for folder in written.values():  # each carries the base's tokenizer and chat template
        assert transformers.AutoTokenizer.from_pretrained(str(folder)).chat_template
    lines = how_to_sample(written, str(base))
    assert any(line.startswith(f"sample from it: elastic generate --base {written['merged']}") for line in lines)


def test_full_fine_tune_writes_an_hf_folder_with_our_logits(tmp_path, base):
    cfg = config(base, None)
    tensors, ours = run_state(cfg)
    written = export_model(tmp_path / "run", cfg, tensors)
    assert list(written) == ["model"]
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(written["model"])).eval()(input_ids=X).logits
        logits_close(ours(X), theirs)
    assert (written["model"] / "tokenizer.json").is_file()
    # Past max_shard_size the folder is split as save_pretrained splits it, and transformers reads the index.
    largest = max(v.nbytes for k, v in tensors.items() if "::" not in k)
    split = export_model(tmp_path / "split", cfg, tensors, max_shard_size=largest)["model"]
    index = json.loads((split / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in split.glob("model-*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    assert not (split / "model.safetensors").exists()
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(split)).eval()(input_ids=X).logits
        logits_close(ours(X), theirs)
    # The command line's full fine-tune: pretrain --base FOLDER --data FILE (no adapters, the folder's weights).
    from elastic.recipes.pretrain.recipe import finetune_config

    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "def f(): return 1"}) + "\n")
    tuned = finetune_config(base, str(data))
    assert (tuned.lora, tuned.train.init_from, tuned.data.dataset) == (None, str(base), str(data))
    with pytest.raises(ValueError, match="give --data FILE"):
        finetune_config(base, None)


def test_a_random_base_is_written_for_the_adapter_and_names_are_kept(tmp_path, base):
    cfg = config(base, LoraConfig(r=4, alpha=8.0))
    tensors, _ = run_state(cfg)
    cfg = cfg.replace(train=TrainConfig(steps=1, global_batch=2, init_from=""))  # as GRPO's toy preset runs
    written = export_model(tmp_path / "run", cfg, tensors)
    assert set(written) == {"base", "adapter"}
    named = json.loads((written["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(written["base"].resolve())
    peft.AutoPeftModelForCausalLM.from_pretrained(str(written["adapter"]))  # loads
    assert base_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id stays as given
    with pytest.raises(ValueError, match="lora.export='merge'"):
        LoraConfig(export="merge")


def test_a_streamed_safetensors_file_reads_as_written_and_refuses_strays(tmp_path):
    tensors = {"b": torch.randn(3, 5, dtype=torch.float64), "a": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, 1:]}  # not contiguous
    out = StreamWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for name, tensor in tensors.items():
        out.write(name, tensor)
    out.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    out = StreamWriter(tmp_path / "y.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="got b, expected a"):
        out.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"a is torch.float64 \(2,\), its entry says torch.float32"):
        out.write("a", torch.zeros(2, dtype=torch.float64))
    out.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2 tensors"):
        out.close()


@pytest.mark.parametrize("layout", ["fsdp=4", "dp=2,tp=2", "fsdp=2,tp=2", "dp=2,pp=2", "fsdp=3"])
def test_each_piece_of_a_tensor_is_sent_once_and_the_writer_keeps_its_own(base, layout):
    """``runtime/export.pieces``: a tensor's distinct boxes tile it exactly, each from one rank, the writer's own
    box from the writer (a replica is not sent twice); and every file gets a writer that holds part of it."""
    from elastic.core.boxes import box_numel
    from elastic.core.layout import Layout, Placement
    from elastic.driver.exporter import choose_writers
    from elastic.model.export import plan_export
    from elastic.model.specs import param_specs
    from elastic.runtime.export import pieces

    cfg = config(base, LoraConfig(r=4, alpha=8.0, export="both"))
    placement = Placement(Layout.parse(layout), tuple(range(Layout.parse(layout).world)))
    n_layers = cfg.model.n_layers
    for spec in param_specs(cfg):
        for writer in range(placement.layout.world):
            got = pieces(placement, spec, n_layers, writer)
            cover = torch.zeros(spec.shape, dtype=torch.int64)
            for rank, box in got:
                assert placement.box(spec, rank, n_layers) == box
                cover[tuple(slice(lo, hi) for lo, hi in box)] += 1
            assert bool((cover == 1).all()), (spec.name, layout, writer)
            mine = placement.box(spec, writer, n_layers)
            if mine is not None and box_numel(mine) > 0:
                assert (writer, mine) in got
    plan = plan_export("run", cfg, max_shard_size=20_000)
    writers = choose_writers(plan, cfg, placement)
    specs = {s.name: s for s in param_specs(cfg)}
    for file, writer in zip(plan.files, writers, strict=True):
        held = [placement.box(specs[s], writer, n_layers) for e in file.entries for s in e.sources]
        assert any(b is not None and box_numel(b) > 0 for b in held), (file.path, writer)
