"""Datasets and the global-index sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.core.config import DataConfig
from elastic.core.data import ArithmeticTask, GlobalSampler, build_dataset, split_microbatches
from elastic.core.tokenizer import ByteTokenizer


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 60), batch=st.integers(1, 13), dp=st.integers(1, 5), micro=st.integers(1, 3),
       seed=st.integers(0, 10))
def test_every_index_exactly_once_per_epoch_for_any_split(n, batch, dp, micro, seed):
    sampler = GlobalSampler(n, batch, seed)
    steps = -(-3 * n // batch)  # cover three epochs
    seen = Counter()
    for step in range(steps):
        parts = []
        for d in range(dp):
            mine = sampler.slice_indices(step, d, dp)
            for mb in split_microbatches(mine, micro):
                parts.extend(mb)
        assert parts == sampler.step_indices(step)  # the slices tile the global batch, in order
        for pos, index in zip(range(step * batch, (step + 1) * batch), parts, strict=True):
            seen[(pos // n, index)] += 1
    for epoch in range(3):
        assert {i for (e, i) in seen if e == epoch} == set(range(n))
    assert set(seen.values()) == {1}


def test_orders_differ_between_epochs_and_seeds():
    a = GlobalSampler(50, 50, 0)
    assert a.step_indices(0) != a.step_indices(1)
    assert GlobalSampler(50, 50, 1).step_indices(0) != a.step_indices(0)


def test_stdlib_corpus_windows_are_shifted_targets():
    ds = build_dataset(DataConfig(dataset="stdlib", seq_len=32, max_corpus_bytes=50_000), 0)
    x, y = ds.sample(3)
    assert x.shape == y.shape == (32,)
    assert (x[1:] == y[:-1]).all()
    assert len(ds) > 100 and ds.holdout_size() >= 1
    hx, _ = ds.sample(0, "holdout")
    assert not any((hx == ds.sample(i)[0]).all() for i in range(len(ds)))


def test_arithmetic_prompts_have_fixed_length_and_masked_labels():
    ds = ArithmeticTask(seq_len=16, num_samples=100, seed=0)
    tok = ByteTokenizer()
    for i in range(20):
        prompt = ds.prompt_ids(i)
        assert len(prompt) == ds.PROMPT_LEN
        x, y = ds.sample(i)
        p = ds.problem(i)
        assert eval(p.prompt[:-1]) == int(p.answer)
        targets = [int(t) for t in y if t != -100]
        assert tok.decode(targets) == p.answer and targets[-1] == tok.eos_id


def test_arithmetic_holdout_problems_never_appear_in_training():
    ds = ArithmeticTask(seq_len=16, num_samples=3000, seed=0)
    train = {ds.problem(i).prompt for i in range(3000)}
    held = {ds.problem(i, "holdout").prompt for i in range(300)}
    assert train.isdisjoint(held)


def test_user_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world " * 200)
    assert len(build_dataset(DataConfig(dataset=str(text), seq_len=16), 0)) > 10
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"{i}?", "completion": f"{i}!"}) for i in range(20)))
    ds = build_dataset(DataConfig(dataset=str(rows), seq_len=16, eval_fraction=0.1), 0)
    assert len(ds) == 18 and ds.holdout_size() == 2
    x, y = ds.sample(0)
    assert ByteTokenizer().decode([int(t) for t in y if t != -100]) == "0!"


def test_bad_datasets_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in"):
        build_dataset(DataConfig(dataset="nope"), 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: cannot be read as json \(line 2 is not valid JSON"):
        build_dataset(DataConfig(dataset=str(bad)), 0)


def test_the_corpus_walk_keeps_rglobs_sorted_order(tmp_path):
    """The stdlib corpus is read by a lazy walk that stops after ``max_corpus_bytes``; it must visit the files in
    ``sorted(rglob("*.py"))``'s order (component-wise: "a.py" < "abc/x.py" < "b.py"), so the corpus, hence every
    sample and the reference, is what it always was. Symlinked folders are not entered, as by rglob."""
    from elastic.core.data import _python_files

    for rel in ["a.py", "abc/x.py", "abc/z/y.py", "ab.py", "b.py", "b/a.py", "B.py", "a-b.py", "note.txt",
                "site-packages/skip.py", "pkg.py/inner.py", "_x.py", "deep/er/est.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link").symlink_to(tmp_path / "abc")
    want = [p for p in sorted(tmp_path.rglob("*.py")) if "site-packages" not in p.parts]
    assert list(_python_files(tmp_path)) == want
    assert tmp_path / "pkg.py" in want and tmp_path / "link" / "x.py" not in want
