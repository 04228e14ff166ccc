"""Resumable checkpoints in safetensors + JSON (no pickle), written atomically.

A checkpoint is a folder ``checkpoints/step-000120/`` holding the trained weights, the optimizer
state, RNG states and ``trainer_state.json``. It is written under a temporary name and renamed
into place, and ``checkpoints/latest`` names it only after that, so a crash mid-write never
leaves a half-written checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftcluster.core.atomic import fsync_directory, fsync_tree, write_text_atomic
from ftcluster.core.checksums import damaged, digests
from ftcluster.core.errors import FtError, naming
from ftcluster.runs.layout import LATEST, TRAINER_STATE, checkpoint_name, checkpoint_step

DEEPSPEED_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's ZeRO shards
CHECKSUMS = "checksums"  # trainer_state.json: each safetensors file's digest when saved
UPLOAD_PREFIX = ".upload-"  # OUTPUT/checkpoints/.upload-step-N-*: a checkpoint's copy that Ray is still copying


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (or may train, under an unfreeze schedule), by name."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            key = f"{index}.{slot}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    for key, value in meta["scalars"].items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    np_state = np.random.get_state(legacy=True)  # the default, spelled out: numpy's stub types a bare call as the dict form
    assert isinstance(np_state, tuple)  # the global RandomState is MT19937, whose legacy state is a tuple
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    keep: int,
    *,
    engine=None,
    is_main: bool = True,
    barrier=lambda: None,
) -> Path:
    """Write ``root/step-N`` atomically, point ``root/latest`` at it, prune old ones.

    Every worker calls this. Under DeepSpeed each worker writes its own ZeRO shard (DeepSpeed's
    sharded format) into the staging folder; the main worker adds the trainer state and moves it
    into place.
    """
    final = root / checkpoint_name(step)
    staging = root / f".tmp-{checkpoint_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    if not is_main:  # a worker on another node writes its shard into its own node's copy
        staging.mkdir(parents=True, exist_ok=True)
    try:
        if engine is not None:
            engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG)
        barrier()
        if is_main:
            if engine is None:
                save_file(trainable_state(model), str(staging / "model.safetensors"))
                optim_tensors, optim_meta = _optimizer_tensors(optimizer)
                save_file(optim_tensors, str(staging / "optimizer.safetensors"))
            else:
                optim_meta = None
            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, str(staging / "rng.safetensors"))
            meta = {
                **trainer_state,
                "step": step,
                "optimizer": optim_meta,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                CHECKSUMS: digests(staging, sorted(p.name for p in staging.glob("*.safetensors"))),
            }
            (staging / TRAINER_STATE).write_text(json.dumps(meta, default=_jsonable))
            fsync_tree(staging)  # the files are on disk before any name points at them
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_directory(root)
    except BaseException as exc:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        named = naming(exc, final)  # a full disk's line names the checkpoint being written
        if named is exc:
            raise
        raise named from exc
    if is_main:
        write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep)
    barrier()
    return final


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def frozen_copy(checkpoint: Path) -> Path:
    """A copy of a checkpoint, for a reader that may still read it after pruning removed the original.

    Ray Train copies a reported checkpoint to its storage in a background thread while training
    goes on, and pruning (training.keep_checkpoints) may remove the original meanwhile. The reader
    is handed this copy instead and deletes it when done. Checkpoint files are written once and
    never changed, so hard links make the copy cost nothing (a plain copy where links fail).
    """
    copy = checkpoint.parent / f"{UPLOAD_PREFIX}{checkpoint.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(checkpoint, copy, copy_function=os.link)
    except OSError:  # a filesystem without hard links
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(checkpoint, copy)
    return copy


def drop_frozen_copies(root: Path) -> None:
    """Remove copies that a reader of an earlier worker group (now gone) left behind."""
    for copy in root.glob(f"{UPLOAD_PREFIX}*"):
        shutil.rmtree(copy, ignore_errors=True)


def copy_checkpoint(source: Path, root: Path, rename: Callable[[str], str]) -> Path:
    """A copy of a one-worker checkpoint as ``root``'s newest, its weights renamed (replacing ``root``'s own
    checkpoint of that step): a PBT exploit inside a shared-base pack, which copies one trial's adapter into
    another's name (models/adapter_set.renamed_adapter). Written as `save_checkpoint` writes, atomically."""
    meta = json.loads((source / TRAINER_STATE).read_text())
    final = root / checkpoint_name(meta["step"])
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    weights = load_file(str(source / "model.safetensors"))
    save_file({rename(name): value for name, value in weights.items()}, str(staging / "model.safetensors"))
    meta[CHECKSUMS] = digests(staging, sorted(meta[CHECKSUMS]))
    (staging / TRAINER_STATE).write_text(json.dumps(meta))
    fsync_tree(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    fsync_directory(root)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    engine=None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state (step, ...).

    A file that differs from when the checkpoint was saved (its checksum) is refused in one line."""
    meta = json.loads((path / TRAINER_STATE).read_text())
    bad = damaged(path, meta.get(CHECKSUMS) or {})
    if bad:
        raise FtError(f"{path}: {', '.join(bad)} missing or changed since the checkpoint was saved (checksum); "
                      f"resume from an earlier checkpoint (name it in {path.parent / LATEST}) or start the run again")
    if engine is not None:
        engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
    else:
        weights = load_file(str(path / "model.safetensors"))
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    restore_rng(load_file(str(path / "rng.safetensors")), meta["rng"])
    return meta


def restore_checkpoint(checkpoint, checkpoint_root: Path, replace: bool = False) -> Path | None:
    """After a restart (or a PBT exploit), copy the launcher's checkpoint into the run's checkpoints folder.

    replace: a PBT exploit brings another trial's checkpoint, which must win over this trial's own
    checkpoint of the same step (one worker, so no other process copies it at the same time).
    """
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:
        step = checkpoint_step(Path(local))
        target = checkpoint_root / checkpoint_name(step)
        if replace and target.exists():
            shutil.rmtree(target)
        if not (target / TRAINER_STATE).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = checkpoint_root / f".restore-{os.getpid()}"
            shutil.copytree(local, staging, dirs_exist_ok=True)
            try:
                os.replace(staging, target)
            except OSError:  # another worker on this node restored it first (checked below)
                shutil.rmtree(staging, ignore_errors=True)
    if not (target / TRAINER_STATE).is_file():
        raise FtError(f"restoring the checkpoint of step {step} into {target} failed; the folder is incomplete")
    return target
