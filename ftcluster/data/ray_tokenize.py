"""The encoding pass of tokenization as a Ray Data job (data.preprocess: ray, or auto on large data).

Rendering through the chat template and tokenizing is most of a first tokenization (about 4,000
rows/s in one process, bench/RESULTS.md). Here Ray Data actors do it, each holding the driver's
encoder (tokenizer included) once, while the process that builds the cache entry keeps everything
that depends on the order of the rows: the split, the data report, the shots, packing, writing.
Results come back in row order (`preserve_order`), so the entry is the one a single process
writes: same key, same files. Only the public Ray Data API is used.

    parts (one per data file)  --read tasks, on this node-->  chunks of rows
        --encode actors, anywhere in the cluster-->  chunks of (origin, example or bad row, encoding)
        --in order-->  the writer in this process (dataset._write_encodings)

Files are read on this node (where a store's shards were fetched): the actors need no access to
the data, only the object store.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ftcluster.data.readers import Row
from ftcluster.errors import DataError

# Total size of the data files from which `auto` tokenizes with Ray Data. At this machine's rates
# (one process about 4,000 rows/s; 2 actors about 1.6 times that; Ray Data's start-up about 14 s),
# the job pays from about 150k rows; bench/data_scale.py's rows average 228 bytes, so 48 MB is about
# 220k of them, a margin above that. Bytes, not rows: counting rows means reading them, and the
# encoding work grows with the text, not with the number of rows.
AUTO_MIN_BYTES = 48 * 2**20
CHUNK_ROWS = 2048  # rows per object passed from a read task to an actor, and back
READERS = 2  # data files read at a time
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node's label: its id


def wanted(preprocess: str, data_bytes: int) -> bool:
    """Whether the process building a cache entry tokenizes with Ray Data: `ray` always (an error when
    Ray is not initialised in this process); `auto` when Ray is and the data files hold at least
    AUTO_MIN_BYTES. Never inside a Ray actor (a training worker, a sweep trial: a training worker holds the CPUs the actors
    would wait for): there the process tokenizes."""
    if preprocess == "process":
        return False
    import ray

    driver = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None
    if preprocess == "ray" and not ray.is_initialized():
        raise DataError("data.preprocess: ray tokenizes on the Ray cluster this process is connected to, and Ray is "
                        "not running here (--no-ray, or a script without ray.init()); set data.preprocess to auto "
                        "or process")
    return driver and (preprocess == "ray" or data_bytes >= AUTO_MIN_BYTES)


def ray_encodings(parts: list[tuple[int, Callable[[], Iterable[Row]]]],
                  encode: Callable[[Iterable[Row]], Iterable[Any]]) -> Iterator[tuple[int, Any]]:
    """``encode`` over the rows of every part, on Ray Data actors: (the part's tag, each item ``encode``
    gave), in part order and row order within a part."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    actors = max(1, int(ray.available_resources().get("CPU", 1)))
    here = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
    with _ordered(DataContext.get_current()):
        dataset: Any = ray.data.from_items([{"part": index} for index in range(len(parts))],
                                           override_num_blocks=len(parts))
        # Reading claims no CPU: the actors may hold every CPU, and a read task waiting for one never starts.
        dataset = dataset.map_batches(functools.partial(_read_parts, parts=parts), batch_size=1, batch_format="pyarrow",
                                      num_cpus=0, compute=TaskPoolStrategy(size=READERS), label_selector=here)
        dataset = dataset.map_batches(_Encode, fn_constructor_args=(encode,), batch_size=1, batch_format="pyarrow",
                                      compute=ActorPoolStrategy(size=actors))
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for tag, chunk in zip(batch.column("tag").to_pylist(), batch.column("chunk").to_pylist()):
                for item in pickle.loads(chunk):
                    yield tag, item


@contextlib.contextmanager
def _ordered(context) -> Iterator[None]:
    """Ray Data's settings of this process for one job: blocks in input order, no progress bars."""
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _chunk(tag: int, items: list) -> Any:
    import pyarrow as pa

    return pa.table({"tag": [tag], "chunk": [pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)]})


def _read_parts(batch: Any, parts: list[tuple[int, Callable[[], Iterable[Row]]]]) -> Iterator[Any]:
    """A read task: one part's rows, in chunks of CHUNK_ROWS (a table of one row each)."""
    for index in batch.column("part").to_pylist():
        tag, rows = parts[index]
        chunk: list[Row] = []
        for row in rows():
            chunk.append(row)
            if len(chunk) == CHUNK_ROWS:
                yield _chunk(tag, chunk)
                chunk = []
        if chunk:
            yield _chunk(tag, chunk)


class _Encode:
    """An encode actor: holds the encoder (and its tokenizer) once, encodes a chunk of rows per call."""

    def __init__(self, encode: Callable[[Iterable[Row]], Iterable[Any]]) -> None:
        self.encode = encode

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        tags, chunks = batch.column("tag").to_pylist(), batch.column("chunk").to_pylist()
        encoded = [pickle.dumps(list(self.encode(pickle.loads(chunk))), protocol=pickle.HIGHEST_PROTOCOL)
                   for chunk in chunks]
        return pa.table({"tag": tags, "chunk": encoded})
