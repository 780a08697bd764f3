"""Archive files: where a day's part lives, and writing, reading and deleting it through fsspec.

Layout: ``<url>/usage_events/day=YYYY-MM-DD/part-<n>.parquet`` (Hive-style, so DuckDB, Spark or
pyarrow read the folder as a dataset partitioned by day). A file is written under a temporary name
and renamed once complete, so a reader never sees half a file under the final name. Columns are those
of ``usage_events``; ``properties`` and ``metadata`` are PostgreSQL's text of the jsonb, so numbers
come back exactly as they were stored. Rows are sorted by (event_type, customer_id, ts, id): the
row groups' statistics then let a reader skip what a query's filter does not need.

pyarrow and fsspec are imported inside the functions: nothing on the ingest path loads them.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

#: Columns of usage_events in table order, as the archive holds them.
COLUMNS = (
    "id",
    "event_type",
    "customer_id",
    "ts",
    "received_at",
    "properties",
    "metadata",
    "stream_seq",
    "stored_at",
)
COMPRESSION = "zstd"
ROW_GROUP_ROWS = 100_000
#: Bytes of CSV per record batch on export (each batch becomes at least one row group).
CSV_BLOCK = 32 << 20


def schema() -> pa.Schema:
    """The Parquet schema of an archive file."""
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("event_type", pa.string(), nullable=False),
            pa.field("customer_id", pa.string(), nullable=False),
            pa.field("ts", ts, nullable=False),
            pa.field("received_at", ts, nullable=False),
            pa.field("properties", pa.string(), nullable=False),  # JSON text (PostgreSQL's jsonb output)
            pa.field("metadata", pa.string(), nullable=False),
            pa.field("stream_seq", pa.int64(), nullable=False),
            pa.field("stored_at", ts, nullable=False),
        ]
    )


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the root path within it (``s3://`` needs s3fs installed)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    return fs, root.rstrip("/")


def part_path(url: str, day: date, part: int) -> str:
    """Where part ``part`` of ``day`` is stored, as a URL (or a local path when ``url`` is one)."""
    return f"{url.rstrip('/')}/usage_events/day={day.isoformat()}/part-{part}.parquet"


def id_hash(event_id: str) -> int:
    """The first 60 bits of md5(id): PostgreSQL computes the same (see :data:`CHECKSUM_SQL`)."""
    return int(hashlib.md5(event_id.encode()).hexdigest()[:15], 16)


#: The checksum over ``id`` in SQL: equal to the sum of :func:`id_hash` over the same ids.
CHECKSUM_SQL = "coalesce(sum(('x' || left(md5(id), 15))::bit(60)::bigint), 0)"


class PartWriter:
    """Writes one part under a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, url: str, day: date, part: int):
        import pyarrow.parquet as pq

        self.path = part_path(url, day, part)
        self.fs, _ = filesystem(self.path)
        self.tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(self.tmp.rsplit("/", 1)[0], exist_ok=True)
        self._file = self.fs.open(self.tmp, "wb")
        self._writer = pq.ParquetWriter(
            self._file, schema(), compression=COMPRESSION, compression_level=6, write_statistics=True
        )
        self.rows = 0

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append a record batch with the columns of :data:`COLUMNS` (from :func:`csv_batches`)."""
        import pyarrow as pa

        self._writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema()))
        self.rows += batch.num_rows

    def commit(self) -> int:
        """Close the file and move it to its final name; return its size in bytes."""
        self._writer.close()
        self._file.close()
        self.fs.mv(self.tmp, self.path)
        return int(self.fs.size(self.path))

    def abort(self) -> None:
        """Close and remove the temporary file."""
        try:
            self._writer.close()
            self._file.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


class _CopyReader(io.RawIOBase):
    """A readable file over a psycopg ``COPY ... TO STDOUT`` (which hands out a row at a time)."""

    def __init__(self, copy: Any):
        self._copy = copy
        self._buf = bytearray()
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while len(self._buf) < len(b) and not self._done:
            chunk = self._copy.read()
            if chunk:
                self._buf += chunk
            else:
                self._done = True
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        del self._buf[:n]
        return n


def csv_batches(copy: Any) -> Iterator[pa.RecordBatch]:
    """Record batches (about :data:`CSV_BLOCK` of CSV each) of a ``COPY (...) TO STDOUT (FORMAT csv)`` of
    the columns :data:`COLUMNS`, typed as :func:`schema` says; memory is bounded by a block."""
    import pyarrow.csv as pcsv

    types = {f.name: f.type for f in schema()}
    reader = pcsv.open_csv(
        io.BufferedReader(_CopyReader(copy), buffer_size=1 << 20),
        read_options=pcsv.ReadOptions(column_names=list(COLUMNS), block_size=CSV_BLOCK),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )
    yield from reader


def batches(path: str, columns: list[str] | None = None, filters: Any = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a part file, optionally only some columns and rows matching ``filters``
    (a pyarrow compute expression; row groups are read whole and filtered in memory, one at a time)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=columns):
            if filters is not None:
                batch = batch.filter(filters)
            if batch.num_rows:
                yield batch


def file_info(path: str) -> dict[str, Any]:
    """Rows, row groups, size and the compression codecs of a part file (from its footer)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        codecs = {
            meta.row_group(g).column(c).compression
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        }
        uncompressed = sum(
            meta.row_group(g).column(c).total_uncompressed_size
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        )
    return {
        "rows": meta.num_rows,
        "row_groups": meta.num_row_groups,
        "bytes": int(fs.size(path)),
        "uncompressed_bytes": uncompressed,
        "codecs": sorted(codecs),
    }


def delete(path: str) -> bool:
    """Remove a part file; False if it was already gone."""
    fs, _ = filesystem(path)
    if not fs.exists(path):
        return False
    fs.rm(path)
    return True
