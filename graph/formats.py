"""Driver side of preprocessing: open an input file, detect its format, stream its raw records.

Only file structure is parsed here (lines, CSV fields, JSON objects), in C where possible, so the
driver stays light; the chemistry happens in the workers. Every record the iterator yields is one
input row: rows are counted here and every one of them ends as a shard row or a reject.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator

from .records import MALFORMED_KEY

FORMATS = ("smiles", "csv", "chebi20", "uspto", "instructions")
SMILES_COLUMNS = ("smiles", "SMILES", "Smiles", "canonical_smiles", "CanonicalSMILES", "smi", "SMI")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long descriptions and peptides


class InputError(ValueError):
    """The input as a whole cannot be read (missing file, unknown format, missing column)."""


def _open(path: str) -> io.TextIOBase:
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    try:
        if path.endswith(".gz"):
            f = gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
        else:
            f = open(path, "rt", encoding="utf-8", errors="replace", newline="")
        f.read(1)  # fail now, not halfway, if the file is unreadable or a broken gzip
        f.seek(0)
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    return f


def _stem(path: str) -> str:
    name = os.path.basename(path).lower()
    return name[:-3] if name.endswith(".gz") else name


def _delimiter(path: str, first_line: str) -> str:
    if _stem(path).endswith(".tsv") or "\t" in first_line:
        return "\t"
    return ","


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def detect_format(path: str) -> str:
    stem = _stem(path)
    if stem.endswith((".json", ".jsonl")) or _is_parquet(path):
        return "instructions"
    with _open(path) as f:
        first = f.readline().rstrip("\r\n")
    header = [h.strip() for h in first.split(_delimiter(path, first))]
    lower = [h.lower() for h in header]
    if any(">" in h for h in header) and ("id" in lower or "class" in lower or "reaction" in " ".join(lower)):
        return "uspto"
    if lower[:3] == ["cid", "smiles", "description"]:
        return "chebi20"
    if stem.endswith((".csv", ".tsv")) or any(h in SMILES_COLUMNS for h in header):
        return "csv"
    return "smiles"


@dataclass
class Source:
    """An opened input: its format, what workers need to know about its layout, and its records."""

    path: str
    fmt: str
    context: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str, fmt: str = "auto", smiles_column: str | None = None) -> "Source":
        if fmt == "auto":
            fmt = detect_format(path)
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")
        src = cls(path, fmt)
        if _is_parquet(path):  # binary, columnar: no text header; a missing column rejects rows later
            if fmt != "instructions":
                raise InputError(f"{path}: Parquet input holds instruction records (format instructions), not {fmt}")
            _parquet_file(path)
            return src
        with _open(path) as f:  # validate the header now: a missing column is an error before any work
            first = f.readline().rstrip("\r\n")
        if fmt == "csv":
            columns = next(csv.reader([first], delimiter=_delimiter(path, first)))
            wanted = [smiles_column] if smiles_column else SMILES_COLUMNS
            found = [c for c in wanted if c in columns]
            if not found:
                raise InputError(
                    f"{path}: no SMILES column ({'/'.join(wanted)}); the columns are {columns}; "
                    "pass --smiles-column NAME"
                )
            src.context = {"columns": columns, "smiles_index": columns.index(found[0])}
        elif fmt == "chebi20" and first.split("\t")[:2] != ["CID", "SMILES"]:
            raise InputError(f"{path}: a ChEBI-20 file starts with the header 'CID<TAB>SMILES<TAB>description'")
        elif fmt == "uspto" and ">" not in first:
            raise InputError(f"{path}: a USPTO file has a header like 'id,class,reactants>reagents>production'")
        return src

    def records(self) -> Iterator:
        """Yield one raw record per input row, in file order."""
        if _is_parquet(self.path):
            yield from _parquet_records(self.path)
            return
        f = _open(self.path)
        with f:
            if self.fmt == "smiles":
                yield from _smiles_records(f)
            elif self.fmt == "instructions":
                yield from _json_records(f, self.path)
            else:
                first = f.readline()
                delim = "\t" if self.fmt == "chebi20" else _delimiter(self.path, first)
                # ChEBI-20 descriptions hold quote characters that are not CSV quoting
                quoting = csv.QUOTE_NONE if self.fmt == "chebi20" else csv.QUOTE_MINIMAL
                yield from csv.reader(f, delimiter=delim, quoting=quoting)


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a truncated or non-Parquet file
        raise InputError(f"cannot read {path} as Parquet: {e}") from None


def _parquet_records(path: str, batch_size: int = 4096) -> Iterator[dict]:
    """Instruction records of a Parquet file, one dict per row, streamed a record batch at a time."""
    for batch in _parquet_file(path).iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def _smiles_records(f) -> Iterator[tuple]:
    """A SMILES file: 'SMILES [name ...]' per line; a first line reading 'smiles ...' is a header."""
    for i, line in enumerate(f):
        parts = line.strip().split(None, 1)
        if i == 0 and parts and parts[0].lower() == "smiles":
            continue
        yield (parts[0] if parts else "", parts[1] if len(parts) > 1 else None)


def _json_records(f, path: str) -> Iterator:
    """JSONL (one object per line) or a JSON array of objects, streamed without loading the file."""
    head = f.read(4096)
    f.seek(0)
    if head.lstrip().startswith("["):
        yield from _json_array(f, path)
        return
    for line in f:
        if not line.strip():
            yield {MALFORMED_KEY: "empty line", "line": ""}
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield {MALFORMED_KEY: f"invalid JSON: {e}", "line": line[:1000]}


def _json_array(f, path: str, block: int = 1 << 20) -> Iterator:
    """Objects of a JSON array, decoded one at a time from a sliding text buffer."""
    decoder = json.JSONDecoder()
    buf = f.read(block)
    pos = buf.index("[") + 1
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(buf, pos)  # also fails on an object cut by the buffer's end
        except json.JSONDecodeError:
            more = f.read(block)
            if not more:  # a broken array has no row boundary to recover from
                what = "is not closed" if pos >= len(buf) else f"is invalid near character {pos}"
                raise InputError(f"{path}: the JSON array {what}") from None
            buf, pos = buf[pos:] + more, 0
            continue
        yield obj
