"""Configs validate themselves with one clear message per problem."""

from __future__ import annotations

import pytest

from elastic.core.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


@pytest.mark.parametrize("build, words", [
    (lambda: ModelConfig(dim=30, n_heads=4), r"model.dim=30 is not divisible by model.n_heads=4"),
    (lambda: ModelConfig(n_heads=4, n_kv_heads=3), "not a multiple of model.n_kv_heads=3"),
    (lambda: ModelConfig(n_layers=0), "model.n_layers=0 must be a positive integer"),
    (lambda: OptimConfig(lr=0), "optim.lr=0 must be > 0"),
    (lambda: TrainConfig(dtype="float16"), "train.dtype='float16' is not one of"),
    (lambda: TrainConfig(global_batch=0), "train.global_batch=0 must be >= 1"),
    (lambda: DataConfig(seq_len=1), "data.seq_len=1 must be >= 2"),
    (lambda: Config(model=ModelConfig(max_seq_len=32), data=DataConfig(seq_len=64)),
     "data.seq_len=64 exceeds model.max_seq_len=32"),
])
def test_bad_config_names_field_and_rule(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_round_trip_through_dict():
    cfg = Config(train=TrainConfig(steps=7, dtype="float64"))
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown fields \['stepz'\] in config section \[train\]"):
        Config.from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown config sections"):
        Config.from_dict({"trian": {}})
