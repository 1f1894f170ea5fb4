"""Atomic file writes: a reader (or a resumed run) sees a whole file or none, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import uuid


def _tmp(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "w"):
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj, path: str) -> None:
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def atomic_write_parquet(table, path: str) -> None:
    import pyarrow.parquet as pq

    with atomic_writer(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
