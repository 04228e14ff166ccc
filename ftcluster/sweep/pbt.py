"""Population based training's values: what it may perturb, and how (Ray Tune's rules).

Why a module: ordinary PBT sweeps hand these to Ray's `PopulationBasedTraining`, and a shared-base
pack runs the same exploit-and-explore over its members itself (sweep/pack_trial.py), so both
perturb the same keys the same way.

A trial that exploits another continues from the other's checkpoint, adapter included: keys that
shape that adapter (its rank, its target modules) are copied from the other trial, never
perturbed, or the copied weights would not fit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

from ftcluster.sweep.space import SearchSpace

ADAPTER_SHAPE = ("method.lora.rank", "method.lora.target_modules")
RESAMPLE_PROBABILITY = 0.25  # Ray's defaults: resample a value, else perturb it by one of the factors
PERTURBATION_FACTORS = (1.2, 0.8)
QUANTILE_FRACTION = 0.25  # the bottom quarter copies the top quarter


def _overlaps(path: str, keys: Iterable[str]) -> bool:
    """``path`` is one of ``keys``, inside one (a key of a searched block), or a block around one."""
    return any(path == key or path.startswith(key + ".") or key.startswith(path + ".") for key in keys)


def pbt_mutations(space: SearchSpace, held: Iterable[str] = ()) -> dict[str, Any]:
    """Ray PBT's ``hyperparam_mutations``: every searched key but expressions, adapter-shaping keys and
    ``held`` ones (a pack's: what its members must share), as a Tune domain or a grid's list."""
    kept = (*ADAPTER_SHAPE, *held)
    return {p.path: (p.args if p.kind == "grid" else p.domain()) for p in space.params
            if p.kind != "expr" and not _overlaps(p.path, kept)}


def explore(chosen: dict[str, Any], mutations: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``chosen`` (a trial's searched values) perturbed as Ray's PBT explores them, drawn from ``rng``."""
    from ray.tune.schedulers.pbt import _explore  # Ray's own rules (resample or scale; shift in a list)

    random.seed(rng.random())  # (Ray draws from the global generator; a pack's trials keep their own apart)
    explored, _ = _explore(chosen, mutations, RESAMPLE_PROBABILITY, PERTURBATION_FACTORS, None)  # type: ignore[arg-type]
    return explored


def quantile_size(population: int) -> int:
    """How many trials are in the top (and in the bottom) quantile, as Ray's PBT counts them."""
    if population <= 1:
        return 0
    size = math.ceil(population * QUANTILE_FRACTION)
    return size if size <= population / 2 else population // 2
