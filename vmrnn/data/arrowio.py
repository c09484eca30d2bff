"""Arrow IPC row files: the storage of the prepared format.

One file per part (e.g. ``train.arrow``). Column 0, ``data``, is ``fixed_size_binary(row_nbytes)``:
one row per sample (TaxiBJ, custom, Moving MNIST test), per frame (KTH) or per digit (MNIST), holding
the row's C-ordered bytes (uint8 pixels or little-endian float32). Optional int32 columns follow
(KTH: ``video``, ``frame_no``). Files are read through ``pyarrow.memory_map`` + ``ipc.open_file``:
rows are numpy views into the mapped file, so nothing is copied or decoded until a sample is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vmrnn.commands import vmrnn_command
from vmrnn.data.base import LazyMixin
from vmrnn.data.errors import DataFormatError


def _le(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


class ArrowRowWriter:
    """Write rows of a fixed shape and dtype (plus optional int32 columns) to an Arrow IPC file."""

    def __init__(
        self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype | str, extra_columns: tuple[str, ...] = ()
    ):
        self.path = Path(path)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = _le(dtype)
        self.row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.extra_columns = tuple(extra_columns)
        fields = [pa.field("data", pa.binary(self.row_nbytes), nullable=False)]
        fields += [pa.field(c, pa.int32(), nullable=False) for c in self.extra_columns]
        self.schema = pa.schema(
            fields, metadata={"row_shape": ",".join(map(str, self.row_shape)), "dtype": self.dtype.str}
        )
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = ipc.new_file(self._sink, self.schema)
        self.rows = 0

    def write(self, rows: np.ndarray, **columns: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} written to a file of rows {self.row_shape}")
        n = rows.shape[0]
        if n == 0:
            return
        data = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self.row_nbytes), n, [None, pa.py_buffer(rows.reshape(-1).view(np.uint8))]
        )
        arrays = [data]
        for c in self.extra_columns:
            v = np.asarray(columns[c], dtype=np.int32)
            if v.shape != (n,):
                raise ValueError(f"column {c} has shape {v.shape}, expected ({n},)")
            arrays.append(pa.array(v, type=pa.int32()))
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.rows += n

    def close(self) -> int:
        self._writer.close()
        self._sink.close()
        return self.rows

    def __enter__(self) -> ArrowRowWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # leave no half-written file behind
            try:
                self._writer.close()
                self._sink.close()
            finally:
                self.path.unlink(missing_ok=True)


class ArrowRows(LazyMixin):
    """Read-only, memory-mapped rows of an Arrow row file; opened lazily in each process.

    ``rows[i]`` is a zero-copy numpy view of row i; ``rows[a:b]`` is a view when the rows lie in one
    record batch (always the case for KTH windows, which never cross a video) and a copy otherwise.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype | str, n_rows: int | None = None):
        self.path = Path(path)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = _le(dtype)
        self.row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.n_rows = n_rows
        self._lazy_views: list[np.ndarray] | None = None
        self._lazy_bounds: np.ndarray | None = None
        self._lazy_reader = None
        if n_rows is None:
            self.n_rows = len(self)

    def _open(self) -> None:
        try:
            mm = pa.memory_map(str(self.path), "r")
            reader = ipc.open_file(mm)
        except FileNotFoundError:
            raise DataFormatError(
                f"{self.path}: prepared file is missing; run `{vmrnn_command('data prepare')}` again", self.path
            ) from None
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(
                f"{self.path}: not a readable Arrow IPC file ({exc}); run `{vmrnn_command('data prepare')}` again",
                self.path,
            ) from None
        field = reader.schema.field(0) if reader.schema.names else None
        if field is None or field.name != "data" or field.type != pa.binary(self.row_nbytes):
            raise DataFormatError(
                f"{self.path}: expected column 'data' of fixed_size_binary({self.row_nbytes}) "
                f"for rows {self.row_shape} {self.dtype}, found schema {reader.schema}",
                self.path,
            )
        views, bounds = [], [0]
        try:
            for b in range(reader.num_record_batches):
                col = reader.get_batch(b).column(0)
                if col.null_count:
                    raise DataFormatError(f"{self.path}: null rows in record batch {b}", self.path)
                buf = col.buffers()[1]
                raw = np.frombuffer(
                    buf, dtype=np.uint8, count=len(col) * self.row_nbytes, offset=col.offset * self.row_nbytes
                )
                views.append(raw.view(self.dtype).reshape(len(col), *self.row_shape))
                bounds.append(bounds[-1] + len(col))
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise DataFormatError(
                f"{self.path}: corrupt Arrow IPC file ({exc}); run `{vmrnn_command('data prepare')}` again", self.path
            ) from None
        if self.n_rows is not None and bounds[-1] != self.n_rows:
            raise DataFormatError(
                f"{self.path}: holds {bounds[-1]} rows, the manifest says {self.n_rows}; "
                f"run `{vmrnn_command('data prepare')}` again",
                self.path,
            )
        self._lazy_reader = (mm, reader)  # keep the mapping alive
        self._lazy_views, self._lazy_bounds = views, np.asarray(bounds, dtype=np.int64)

    def _ensure(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self._lazy_views is None:
            self._open()
        return self._lazy_views, self._lazy_bounds  # type: ignore[return-value]

    def __len__(self) -> int:
        if self.n_rows is not None:
            return self.n_rows
        return int(self._ensure()[1][-1])

    def __getitem__(self, idx: int | slice) -> np.ndarray:
        views, bounds = self._ensure()
        n = int(bounds[-1])
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                raise IndexError("only contiguous slices are supported")
            if stop <= start:
                return np.empty((0, *self.row_shape), self.dtype)
            b = int(np.searchsorted(bounds, start, side="right")) - 1
            if stop <= bounds[b + 1]:
                return views[b][start - bounds[b] : stop - bounds[b]]
            return np.stack([self[i] for i in range(start, stop)])
        i = int(idx)
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows in {self.path}")
        if len(views) == 1:
            return views[0][i]
        b = int(np.searchsorted(bounds, i, side="right")) - 1
        return views[b][i - bounds[b]]

    def column(self, name: str) -> np.ndarray:
        """An int32 side column, read whole (a copy)."""
        self._ensure()
        _, reader = self._lazy_reader  # type: ignore[misc]
        if name not in reader.schema.names:
            raise DataFormatError(
                f"{self.path}: column {name!r} is missing; run `{vmrnn_command('data prepare')}` again", self.path
            )
        j = reader.schema.names.index(name)
        parts = [reader.get_batch(b).column(j).to_numpy(zero_copy_only=False) for b in range(reader.num_record_batches)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
