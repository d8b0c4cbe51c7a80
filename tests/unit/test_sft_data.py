"""A folder's tokenizer and chat template, and TRL's dataset formats from local files.

The tokenizer is a BPE trained here by ``tokenizers`` and saved with a ChatML template
(``elastic/tools/tiny_hf.py``). Loss masks are checked against text written out by hand: the
tokens that carry loss must decode to exactly the completion, or the assistant turns.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from elastic.core.config import Config, DataConfig, ModelConfig, TrainConfig
from elastic.core.data import build_dataset, check_data
from elastic.core.dataset import IGNORE
from elastic.core.tokenizer import HFTokenizer, check_vocabulary
from elastic.tools.tiny_hf import write_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(path, tok_dir, seq_len=64):
    return build_dataset(DataConfig(dataset=str(path), tokenizer=str(tok_dir), seq_len=seq_len,
                                    eval_fraction=0.0), seed=0)


def loss_text(tok: HFTokenizer, labels: torch.Tensor) -> str:
    return tok.tok.decode(labels[labels != IGNORE].tolist())


def test_folder_tokenizer_specials_and_template(tok_dir):
    tok = HFTokenizer(tok_dir)
    assert tok.vocab_size == 400 and tok.bos_id is None
    assert (tok.eos_id, tok.pad_id) == (tok.tok.convert_tokens_to_ids("<|im_end|>"),
                                        tok.tok.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.decode(tok.encode("def f(x):\n    return x", eos=True)) == "def f(x):\n    return x"
    rendered = tok.tok.decode(tok.chat_ids(CHAT[:2], add_generation_prompt=True))
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_prompt_completion_loss_is_on_the_completion_only(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "x = 1 + ", "completion": "2"},
                                               {"prompt": "import ", "completion": "os"}])
    ds, tok = dataset(path, tok_dir), HFTokenizer(tok_dir)
    assert ds.format == "prompt-completion"
    x, y = ds.sample(0)
    assert loss_text(tok, y) == "2<|im_end|>"
    assert tok.tok.decode(x[: len(tok.encode("x = 1 + 2")) + 1].tolist()) == "x = 1 + 2<|im_end|>"


def test_conversation_loss_is_on_assistant_turns_only(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    ds, tok = dataset(path, tok_dir, seq_len=128), HFTokenizer(tok_dir)
    assert ds.truncated == 0
    assert ds.format == "conversational"
    _, y = ds.sample(0)
    assert loss_text(tok, y) == "Hi there<|im_end|>\nBye<|im_end|>\n"
    _, y1 = ds.sample(1)
    assert loss_text(tok, y1) == "Hi there<|im_end|>\n"


def test_text_in_parquet_and_truncation_is_counted(tmp_path, tok_dir):
    path = tmp_path / "lm.parquet"
    pq.write_table(pa.table({"text": ["short text", "a much longer text " * 20, "x"]}), path)
    ds, tok = dataset(path, tok_dir, seq_len=16), HFTokenizer(tok_dir)
    assert ds.format == "text" and len(ds) == 3 and ds.truncated == 1
    x, y = ds.sample(0)
    assert loss_text(tok, y) == tok.tok.decode(tok.encode("short text", eos=True)[1:])
    assert (y[len(tok.encode("short text")):] == IGNORE).all()  # padding carries no loss
    assert x.shape == (16,) and (ds.sample(1)[1] != IGNORE).all()


def test_bad_inputs_are_one_clear_error(tmp_path, tok_dir):
    with pytest.raises(ValueError, match=r"columns \['question'\] fit no TRL dataset format.*'prompt'\+'completion'"):
        dataset(write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}, {"question": "b"}]), tok_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: cannot be read as json \(line 2 is not valid JSON"):
        dataset(bad, tok_dir)
    bare = write_tokenizer(tmp_path / "bare", chat_template=None)
    with pytest.raises(ValueError, match="needs a chat template and this tokenizer has none"):
        dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2), bare)
    with pytest.raises(ValueError, match="needs a chat template, and the byte tokenizer has none"):
        build_dataset(DataConfig(dataset=str(tmp_path / "c.jsonl")), 0)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match="no sample keeps a token that carries loss.*raise data.seq_len"):
        dataset(write_jsonl(tmp_path / "long.jsonl", [{"messages": CHAT}] * 2), tok_dir, seq_len=8)
    with pytest.raises(ValueError, match="has no assistant turn"):
        dataset(write_jsonl(tmp_path / "u.jsonl", [{"messages": CHAT[:2]}] * 2), tok_dir)


def test_vocabulary_mismatch_is_refused_before_any_worker(tmp_path, tok_dir):
    check_vocabulary(HFTokenizer(tok_dir), 448)  # a model may have spare rows (padded vocabularies)
    cfg = Config(model=ModelConfig(vocab_size=300), data=DataConfig(tokenizer=str(tok_dir)),
                 train=TrainConfig(steps=1))
    with pytest.raises(ValueError, match="has 400 tokens but the model has vocab_size=300"):
        check_data(cfg)


def test_a_file_is_tokenised_once_then_read_from_the_process_or_the_disk_cache(tmp_path, tok_dir, monkeypatch):
    """What every engine build (each reshard, recovery and new worker) does: build the dataset again. Only the
    first build may read and tokenise the file; later builds read the rows this process holds, or the cache
    another process wrote, and give the same samples. A changed file is tokenised again."""
    from elastic.core import sft_data, token_cache

    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 3 + [{"messages": CHAT[:3]}] * 2)
    before = token_cache.TOKENISED["files"]
    first = dataset(path, tok_dir)
    assert token_cache.TOKENISED["files"] == before + 1
    expected = [first.sample(i) for i in range(len(first))]

    def no_reading(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(sft_data, "read_rows", no_reading)
    again = dataset(path, tok_dir)  # in this process: nothing read
    token_cache.forget_in_process()
    from_disk = dataset(path, tok_dir)  # as a new worker on this machine: the cache folder, memory-mapped
    for other in (again, from_disk):
        assert other.format == "conversational" and len(other) == len(first)
        assert all(torch.equal(a, b) for i in range(len(first)) for a, b in zip(other.sample(i), expected[i],
                                                                                 strict=True))
    assert token_cache.TOKENISED["files"] == before + 1
    monkeypatch.undo()
    write_jsonl(path, [{"messages": CHAT[:3]}] * 4)  # the file changed: its rows are tokenised again
    assert len(dataset(path, tok_dir)) == 4 and token_cache.TOKENISED["files"] == before + 2
