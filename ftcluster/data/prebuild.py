"""Under `ftcluster train` with Ray, the launcher fills the tokenized-data cache before the workers start,
when the data is tokenized with Ray Data (data.preprocess: ray, or auto on large data).

A Ray Data job needs the cluster's CPUs, which the training workers hold once they start; and one
build serves them all. The workers then open the entry (`tokenized data: ... (from the cache)`).
They look for it where the launcher built it: on one node the launcher names that folder in the
workers' spec (data.cache_dir; not part of the cache key), since a worker's default cache may be
another folder ($FTCLUSTER_CACHE is this shell's, not forwarded). On several nodes the entry only
reaches the workers through data.cache_dir on a mount they share, so `ray` without it is refused
and `auto` leaves tokenizing to each node's first worker, as before.
"""

from __future__ import annotations

import time

from ftcluster.data.dataset import build_data, data_sources, use_ray_data
from ftcluster.errors import DataError
from ftcluster.models.load import load_tokenizer, resolve_model
from ftcluster.spec import JobSpec


def build_before_workers(spec: JobSpec, say=print) -> JobSpec:
    """Tokenize with Ray Data here if data.preprocess says so; the spec the workers get (``spec``, or a
    copy naming the cache folder). Call with Ray initialised and the data paths absolute."""
    data = spec.data
    if data.preprocess == "process":
        return spec
    import ray

    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes > 1 and not data.cache_dir:
        if data.preprocess == "ray":
            raise DataError(f"data.preprocess: ray on a cluster of {nodes} nodes needs data.cache_dir on a mount every "
                            "node shares (else each node's workers tokenize again on their own disk); set it, or set "
                            "data.preprocess to auto or process")
        return spec
    train, val = data_sources(data)
    if not use_ray_data(data, [train, val]):
        return spec
    start = time.perf_counter()
    bundle = build_data(data, load_tokenizer(resolve_model(spec.model.path), spec.model.revision))
    assert bundle.cache is not None
    how = "from the cache" if bundle.from_cache else f"tokenized with Ray Data in {time.perf_counter() - start:.1f} s"
    say(f"tokenized data: {bundle.cache} ({how})")
    if data.cache_dir:
        return spec
    pinned = spec.model_copy(deep=True)
    pinned.data.cache_dir = str(bundle.cache.parent)
    return pinned
