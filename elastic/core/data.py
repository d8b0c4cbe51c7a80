"""Datasets and the global-index sampler (DESIGN.md, "Data cursor").

Samples are addressed by a global index. Training position ``p`` maps to epoch ``p // N`` and
to index ``perm_epoch[p % N]`` in a permutation seeded by (seed, epoch); step ``s`` consumes
positions ``[s*B, (s+1)*B)``. The step number is therefore the whole data cursor: a reshard or
a recovery continues from it and no sample is skipped or repeated.

Built-in datasets work offline:
- ``stdlib``: a byte corpus of the Python standard library's own source files;
- ``arithmetic``: exact-answer sums and differences ("47+38=" -> "85"), for fine-tuning and RL;
- a user ``.txt`` file (cut into windows);
- a JSON, JSONL or Parquet file in one of TRL's formats (``sft_data.py``).

Held-out rows (``split="holdout"``, for evaluation) are the last ``data.eval_fraction`` of a file's rows or
windows, never sampled for training; the built-in tasks hold out a disjoint part of their problem space. With
``data.eval_data`` they are every row of that file instead, and the training data is used whole
(``WithEvalSet``).

``data.tokenizer`` names a model folder whose tokenizer encodes the text (empty: bytes).

Every sample is a pair (input_ids, labels) of ``seq_len`` tokens; labels are -100 where no loss
is taken (prompt and padding).
"""

from __future__ import annotations

import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.core.boxes import balanced
from elastic.core.config import Config, DataConfig
from elastic.core.dataset import IGNORE, Dataset, held_out
from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import PAD, ByteTokenizer, check_vocabulary, load_tokenizer


class TokenWindows(Dataset):
    """A token stream cut into non-overlapping windows of seq_len + 1 (inputs and shifted targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, eval_fraction: float) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        windows = (len(tokens) - 1) // seq_len
        if windows < 2:
            raise ValueError(
                f"corpus of {len(tokens)} tokens gives {windows} windows of seq_len={seq_len}; "
                "use a bigger corpus or a shorter seq_len"
            )
        self.n_holdout = held_out(windows, eval_fraction)
        self.n_train = windows - self.n_holdout

    def __len__(self) -> int:
        return self.n_train

    def holdout_size(self) -> int:
        return self.n_holdout

    def sample(self, index: int, split: str = "train"):
        window = index if split == "train" else self.n_train + index
        start = window * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:].clone()


def _python_files(folder: Path):
    """The ``.py`` files under ``folder`` in ``sorted(folder.rglob("*.py"))``'s order, lazily: a depth-first walk
    over each folder's sorted entries gives the same component-wise order, and the caller stops after a few
    hundred kB instead of listing and sorting the whole standard library (most of a worker's dataset build).
    Like ``rglob``, symlinked folders are not entered; ``site-packages`` is skipped."""
    try:
        entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.endswith(".py"):
            yield entry
        if entry.name != "site-packages" and entry.is_dir() and not entry.is_symlink():
            yield from _python_files(entry)


@functools.lru_cache(maxsize=4)
def stdlib_bytes(max_bytes: int) -> bytes:
    """The standard library's .py files, sorted by path, joined, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in _python_files(root):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data) + 2
        if total >= max_bytes:
            break
    if not parts:
        raise ValueError(f"no Python source files found under {root}; use a .txt dataset instead")
    return b"\n\n".join(parts)[:max_bytes]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


class ExactAnswerTask(Dataset):
    """Synthetic problems with one exact answer: ``num_samples`` training problems drawn per index,
    ``holdout`` evaluation ones from a disjoint part of the problem space. Subclasses define
    ``problem(index, split)`` and ``prompt_ids``."""

    def __init__(self, seq_len: int, num_samples: int, seed: int = 0, holdout: int = 512, tok=None) -> None:
        self.seq_len, self.n, self.seed, self.n_holdout = seq_len, num_samples, seed, holdout
        self.tok = tok or ByteTokenizer()

    def __len__(self) -> int:
        return self.n

    def holdout_size(self) -> int:
        return self.n_holdout

    def problem(self, index: int, split: str = "train") -> Problem:
        raise NotImplementedError

    def prompt_ids(self, index: int, split: str = "train") -> list[int]:
        return self.tok.encode(self.problem(index, split).prompt, bos=True)

    def sample(self, index: int, split: str = "train"):
        p = self.problem(index, split)
        return _pack(self.tok.encode(p.prompt, bos=True), self.tok.encode(p.answer, eos=True), self.seq_len,
                     pad_id=self.tok.pad_id)


class ArithmeticTask(ExactAnswerTask):
    """'a+b=' or 'a-b=' with two-digit operands; the completion is the exact answer then EOS.

    Prompts all have the same length, so a batch of prompts needs no padding. The problem space
    is split by a hash so that held-out problems never appear in training.
    """

    name = "arithmetic"
    PROMPT_LEN = 7  # BOS + "ab+cd="

    def __init__(self, seq_len: int, num_samples: int, seed: int = 0, holdout: int = 512, tok=None) -> None:
        if seq_len < self.PROMPT_LEN + 5:
            raise ValueError(f"arithmetic needs seq_len >= {self.PROMPT_LEN + 5}, got {seq_len}")
        super().__init__(seq_len, num_samples, seed, holdout, tok)

    @staticmethod
    def _is_holdout(a: int, b: int, op: str) -> bool:
        return stable_seed("arith-split", a, op, b) % 8 == 0

    def problem(self, index: int, split: str = "train") -> Problem:
        rng = random.Random(stable_seed(self.seed, "arith", split, index))
        while True:
            a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
            if self._is_holdout(a, b, op) == (split != "train"):
                break
        return Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))


def _pack(prompt: list[int], completion: list[int], seq_len: int, shift_all: bool = False, pad_id: int = PAD):
    """Inputs and next-token labels for prompt+completion, right-padded/truncated to seq_len.

    Loss is taken on completion tokens only (all tokens when ``shift_all``). Right padding is
    harmless to a causal model: padded positions come after every real one.
    """
    ids = (prompt + completion)[: seq_len + 1]
    ids = ids + [pad_id] * (seq_len + 1 - len(ids))
    tokens = torch.tensor(ids, dtype=torch.long)
    labels = tokens[1:].clone()
    first_target = 0 if shift_all else max(len(prompt) - 1, 0)
    labels[:first_target] = IGNORE
    real = min(len(prompt) + len(completion), seq_len + 1) - 1
    labels[real:] = IGNORE
    return tokens[:-1], labels


class WithEvalSet(Dataset):
    """Training samples from one dataset, held-out ones from every sample of another (``data.eval_data``)."""

    def __init__(self, train: Dataset, held: Dataset) -> None:
        self.train, self.held, self.seq_len = train, held, train.seq_len

    def __len__(self) -> int:
        return len(self.train)

    def holdout_size(self) -> int:
        return len(self.held)

    def sample(self, index: int, split: str = "train"):
        return self.train.sample(index) if split == "train" else self.held.sample(index)


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset named by ``cfg.dataset``, tokenized by ``cfg.tokenizer`` (validated here), with its held-out
    rows from ``cfg.eval_data`` when that is set."""
    if not cfg.eval_data:
        return _build(cfg, cfg.dataset, seed, cfg.eval_fraction)
    if cfg.eval_data in ("stdlib", "arithmetic") or not Path(cfg.eval_data).is_file():
        raise ValueError(f"data.eval_data={cfg.eval_data!r} is not an existing file; give a .txt, .json, .jsonl or "
                         ".parquet file of held-out rows (or leave it empty to hold out data.eval_fraction)")
    return WithEvalSet(_build(cfg, cfg.dataset, seed, 0.0), _build(cfg, cfg.eval_data, seed, 0.0))


def _build(cfg: DataConfig, name: str, seed: int, eval_fraction: float) -> Dataset:
    tok = _tokenizer(cfg.tokenizer)
    if name == "arithmetic":
        return ArithmeticTask(cfg.seq_len, cfg.num_samples, seed, tok=tok)
    if name == "stdlib":
        text = stdlib_bytes(cfg.max_corpus_bytes)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"data.dataset={name!r} is neither a built-in ('stdlib', 'arithmetic') nor an existing file"
            )
        if path.suffix in (".json", ".jsonl", ".parquet"):
            from elastic.core.sft_data import RecordsDataset

            return RecordsDataset(path, tok, cfg.seq_len, eval_fraction)
        text = path.read_bytes()[: cfg.max_corpus_bytes]
    if isinstance(tok, ByteTokenizer):
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    else:
        tokens = _token_stream(cfg.tokenizer, text)
    return TokenWindows(tokens, cfg.seq_len, eval_fraction)


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
    return load_tokenizer(folder)


@functools.lru_cache(maxsize=4)
def _token_stream(folder: str, text: bytes) -> torch.Tensor:
    return torch.tensor(_tokenizer(folder).encode(text.decode("utf-8", errors="replace")), dtype=torch.long)


def check_data(cfg: Config) -> None:
    """Build the run's dataset on the driver and check its tokenizer against the model, so that a bad
    file, column or tokenizer is one clear error before any worker starts."""
    check_vocabulary(_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)
    dataset = build_dataset(cfg.data, cfg.train.seed)
    if cfg.train.eval_every and not dataset.holdout_size():
        raise ValueError(f"train.eval_every={cfg.train.eval_every} but {cfg.data.dataset!r} holds out no rows "
                         f"(data.eval_fraction={cfg.data.eval_fraction}); raise data.eval_fraction or give "
                         "data.eval_data FILE")


class GlobalSampler:
    """Maps (step, data-parallel slice, micro-batch) to global sample indices; see the module doc."""

    def __init__(self, num_samples: int, global_batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = num_samples, global_batch, seed
        self._perm: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.pop(min(self._perm))
            gen = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", epoch))
            self._perm[epoch] = torch.randperm(self.n, generator=gen)
        return self._perm[epoch]

    def index_at(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        return int(self._permutation(epoch)[within])

    def step_indices(self, step: int) -> list[int]:
        start = step * self.batch
        return [self.index_at(p) for p in range(start, start + self.batch)]

    def slice_indices(self, step: int, data_index: int, data_parallel: int) -> list[int]:
        """The part of step ``step``'s batch consumed by data-parallel slice ``data_index``."""
        lo, hi = balanced(self.batch, data_parallel, data_index)
        start = step * self.batch
        return [self.index_at(p) for p in range(start + lo, start + hi)]


def split_microbatches(indices: list[int], microbatches: int) -> list[list[int]]:
    return [indices[slice(*balanced(len(indices), microbatches, m))] for m in range(microbatches)]
