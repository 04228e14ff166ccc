"""Load pretrained weights into a ZeRO-3 model without any process holding the whole model.

The model is built from its config inside DeepSpeed's zero.Init (each worker keeps only its
shard), then the checkpoint is streamed one tensor at a time: rank 0 reads a tensor from the
safetensors file (plain reads, no memory map, so the file's pages are not charged to the
process) and DeepSpeed scatters it. The peak per worker is its shard plus the largest tensor,
not a full copy, which is what a plain `from_pretrained` costs every worker under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ftcluster.core.errors import ModelError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"model.path: {folder} has no safetensors weights (needed for ZeRO-3 streaming loads)")


def _header(handle) -> tuple[int, list[tuple[str, dict]]]:
    """A safetensors file's layout: an 8-byte little-endian header length, then a JSON header of
    dtype/shape/offsets per tensor. Returns the data start and the entries in file order."""
    (header_size,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    return 8 + header_size, sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, each read into its own buffer (plain reads, no memory map)."""
    with path.open("rb") as handle:
        data_start, entries = _header(handle)
        for name, entry in entries:
            start, end = entry["data_offsets"]
            handle.seek(data_start + start)
            buffer = bytearray(end - start)
            handle.readinto(buffer)
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])


def _names_only(path: Path) -> Iterator[tuple[str, None]]:
    """The tensor names of a file in the order rank 0 reads them (every rank gathers in step)."""
    with path.open("rb") as handle:
        _, entries = _header(handle)
    for name, _ in entries:
        yield name, None


@contextlib.contextmanager
def return_freed_memory():
    """While building a partitioned model, let glibc hand freed tensor memory back to the OS at
    once (mmap every allocation >= 64 KiB); after, a fixed 32 MiB threshold (glibc's own
    steady-state maximum) keeps training allocations on the fast heap path. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)


@torch.no_grad()
def load_partitioned(config, auto_class, dtype, folder: Path, rank: int) -> torch.nn.Module:
    """Build under zero.Init (active because an HfDeepSpeedConfig with stage 3 is alive) and
    stream the weights in; parameters the files lack (a fresh head) keep their initialisation."""
    import deepspeed

    files = safetensors_files(folder)
    with return_freed_memory():
        model = auto_class.from_config(config, dtype=dtype)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for path in files:
            for name, value in (read_tensors(path) if rank == 0 else _names_only(path)):
                target = tensors.get(name)
                if target is None:
                    continue
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        assert value is not None  # rank 0 reads the tensors, the other ranks only their names
                        target.data.copy_(value.to(target.dtype))
    return model

