"""Parquet (pyarrow): LAION/img2dataset-style pairs, text tables and OBELICS-style interleaved tables.

Pairs have an image column (bytes, a path/URL, or the Hugging Face ``Image`` struct ``{"bytes",
"path"}``) and a caption column; text tables a ``text_field`` column; interleaved tables ``texts`` and
``images`` list columns; conversation tables a ``messages`` list column (see ``base.MessagesFormat``).
One unit per row group, named ``"FILE#rgN"``; only the columns a sample uses and the scalar ones (its
metadata) are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from chameleon_lm.data.sources import paths
from chameleon_lm.data.sources.base import (
    MessagesFormat, Sample, SkipSample, Skipped, SourceConfig, UnitSource, is_messages, scalar_meta,
)
from chameleon_lm.data.sources.records import RecordFormat

PARQUET_SUFFIXES = (".parquet",)
_BATCH_ROWS = 256


@contextmanager
def _open(path: str) -> Iterator[Any]:
    """The ``pyarrow.parquet.ParquetFile`` of a local path or fsspec URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # deferred: pyarrow is only needed for parquet

    with ExitStack() as stack:
        # a local path is read by pyarrow's own file reader, a URL through fsspec
        source = stack.enter_context(paths.open_binary(path)) if paths.is_url(path) else path
        try:
            parquet = stack.enter_context(pq.ParquetFile(source))
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        yield parquet


def _is_image_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return any(arrow_type.field(i).name in ("bytes", "path") for i in range(arrow_type.num_fields))
    return (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
            or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


def _is_list_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def _is_scalar_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    t = pa.types
    return (t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_integer(arrow_type)
            or t.is_floating(arrow_type) or t.is_boolean(arrow_type) or t.is_null(arrow_type))


class ParquetSource(UnitSource):
    """Samples from parquet files; the kind is chosen from the first file's columns unless given."""

    format = "parquet"

    def __init__(self, config: SourceConfig):
        self._files = paths.find_files(config.path, PARQUET_SUFFIXES, "parquet files")
        self._layout: dict[str, tuple[list[int], Any]] = {}
        schema = self._file_layout(self._files[0])[1]
        if is_messages(config, schema.names, lambda name: _is_list_type(schema.field(name).type)):
            self.records = MessagesFormat(config)
        else:
            self.records = RecordFormat(config, schema.names,
                                        lambda name: _is_image_type(schema.field(name).type),
                                        self._files[0])
        super().__init__(config, self.records.kind)

    def _file_layout(self, path: str) -> tuple[list[int], Any]:
        """Rows per row group and the arrow schema of a file (its footer, read once)."""
        if path not in self._layout:
            with _open(path) as parquet:
                meta = parquet.metadata
                rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                self._layout[path] = rows, parquet.schema_arrow
        return self._layout[path]

    def _list_units(self) -> list[str]:
        return [f"{path}#rg{i}" for path in self._files
                for i in range(len(self._file_layout(path)[0]))]

    def _locate(self, unit: str) -> tuple[str, int]:
        path, sep, group = unit.rpartition("#rg")
        if sep and path in self._files and group.isdigit():
            if int(group) < len(self._file_layout(path)[0]):
                return path, int(group)
        raise KeyError(f"{unit!r} is not a unit of {self.config.path}")

    def _check_unit(self, unit: str) -> None:
        self._locate(unit)  # reads only the unit's own footer

    def _read(self, unit: str) -> Iterator[Sample | Skipped]:
        import pyarrow as pa

        path, group = self._locate(unit)
        rows, schema = self._file_layout(path)
        columns = [f.name for f in schema
                   if f.name in self.records.used or _is_scalar_type(f.type)]
        row = sum(rows[:group])
        folder = paths.dirname(path)
        with _open(path) as parquet:
            batches = parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group],
                                           columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    yield Skipped(unit, "corrupt_row_group",
                                  f"{unit}: unreadable after {row - sum(rows[:group])} rows ({e})")
                    return
                if batch is None:
                    return
                for record in batch.to_pylist():
                    yield self._sample(f"{unit}/{row}", record, folder)
                    row += 1

    def _sample(self, key: str, record: dict[str, Any], folder: str) -> Sample | Skipped:
        try:
            parsed = self.records.parse(record, key, folder)
        except SkipSample as e:
            return Skipped(key, e.reason, e.detail)
        segments, roles = parsed if self.kind == "messages" else (parsed, None)
        return Sample(key, segments, scalar_meta(record, exclude=self.records.used), roles)
