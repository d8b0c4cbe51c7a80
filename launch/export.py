"""``elastic export``: the model of any on-disk checkpoint as the folders users load, without the job.

    elastic export RUN_DIR/checkpoints                  # its newest checkpoint
    elastic export RUN_DIR/checkpoints/step_000300 --out policy-300 --how merged

A run saves its model at its end (``model/export.py``); its checkpoints (written during the run, every
``control.checkpoint_every`` steps or minutes) hold the whole state in the layout-independent format of
``core/checkpoint.py``, with the run's configuration in the manifest. This reads the parameters (not the
optimizer state) of one checkpoint on this machine and writes them the way the run's end does: a PEFT adapter
that names its base (and ``merged`` / ``both`` as ``lora.export``), or a Hugging Face folder for a full
fine-tune. So a GRPO or LoRA policy of any checkpointed step can be sampled and loaded. The checkpoint is
verified (checksums, coverage) first; a bad one is refused in one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it is one checkpoint, else the newest one in it (a checkpoint dir or a run dir)."""
    from elastic.core import checkpoint as ckpt

    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return ckpt.latest(root)
    raise ValueError(f"{path} is not a checkpoint (no manifest.json) and holds none (no 'latest' in it or in "
                     f"{path / 'checkpoints'}); give RUN_DIR, RUN_DIR/checkpoints or one step_NNNNNN folder")


def export_checkpoint(path: Path, out: Path | None = None, how: str | None = None) -> tuple[dict[str, Path], str]:
    """Write the model of the checkpoint at ``path`` under ``out`` (default: beside it, ``<step folder>-export``);
    returns what was written and the run's base folder ("" when it had none)."""
    import elastic.control.config  # noqa: F401 (registers [control]: the manifest holds every section)
    import elastic.recipes.registry  # noqa: F401 (registers the recipes' sections)
    from elastic.core.checkpoint import open_checkpoint, read_boxes
    from elastic.core.config import Config
    from elastic.model.export import export_model
    from elastic.model.specs import DTYPE, training_specs

    folder = checkpoint_folder(Path(path))
    cfg = Config.from_dict(json.loads((folder / "manifest.json").read_text())["config"])
    specs = training_specs(cfg)
    checkpoint = open_checkpoint(folder, cfg, specs)
    wanted = {s.name: tuple((0, n) for n in s.shape) for s in specs if "::" not in s.name}  # no optimizer state
    tensors = read_boxes(checkpoint, wanted, DTYPE[cfg.train.dtype])
    return export_model(out or folder.parent / f"{folder.name}-export", cfg, tensors, how), cfg.train.init_from


def cmd_export(args: argparse.Namespace) -> int:
    from elastic.model.export import how_to_sample

    written, base = export_checkpoint(Path(args.path), Path(args.out) if args.out else None, args.how)
    for line in how_to_sample(written, base or None):
        print(line)
    return 0


def add_parser(sub) -> None:
    export = sub.add_parser("export", help="write a checkpoint's model as a PEFT adapter or a Hugging Face folder")
    export.add_argument("path", help="RUN_DIR, RUN_DIR/checkpoints (its newest checkpoint) or one step_NNNNNN folder")
    export.add_argument("--out", help="where to write (default: beside the checkpoint, <step folder>-export)")
    export.add_argument("--how", choices=("adapter", "merged", "both"),
                        help="for LoRA runs, as lora.export (default: the run's own lora.export)")
    export.set_defaults(handler=cmd_export)
