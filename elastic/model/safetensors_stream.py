"""A safetensors file written one tensor at a time, so the writer never holds more than one tensor.

``safetensors.torch.save_file`` takes the whole dict at once; the library has no incremental writer. The
format is simple and fixed (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range, then the tensors' bytes back to back. When
every name, dtype and shape is known before the first byte (an export's plan knows them), the header can be
written first and each tensor appended as it arrives. The result is read by ``safetensors.safe_open``,
transformers and PEFT like any other file (``tests/unit/test_streamed_export.py`` checks it byte for byte
against ``save_file``'s reading). No distributed code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

# safetensors' names for the dtypes a run's tensors can have.
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class StreamWriter:
    """Writes ``entries`` ([(name, dtype, shape)], in that order) to ``path``: ``write`` each in turn, then
    ``close`` (which checks that every one came and fsyncs). A tensor of another dtype or shape than its entry,
    or out of order, is refused by name."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path, self.entries, self.next = Path(path), list(entries), 0
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.entries:
            if dtype not in DTYPES:
                raise ValueError(f"{self.path}: {name} has dtype {dtype}, which this writer does not know")
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after the last tensor)
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor`` as entry ``name`` (the next in order); returns its bytes."""
        if self.next >= len(self.entries) or self.entries[self.next][0] != name:
            expected = self.entries[self.next][0] if self.next < len(self.entries) else "nothing more"
            raise ValueError(f"{self.path}: got {name}, expected {expected}")
        _, dtype, shape = self.entries[self.next]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, its entry says "
                             f"{dtype} {tuple(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.fh.write(data.data)
        self.next += 1
        return data.nbytes

    def close(self) -> None:
        if self.next != len(self.entries):
            self.fh.close()
            raise ValueError(f"{self.path}: closed after {self.next} of {len(self.entries)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
