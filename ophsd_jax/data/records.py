"""Reading rows from JSON / JSONL / CSV files, with exact locations for errors.

Readers yield `Row` objects; a `Row` knows where it came from, so every field
check can raise a `DataError` naming the file, the row and the field.
Problems that make a single row unreadable (a malformed JSONL line, a CSV
line with the wrong number of columns) go through `handle_bad_row`, so
`on_error="skip"` skips them; problems that make the whole file unreadable
(missing file, invalid JSON document) always raise.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any, Iterator

from ophsd_jax.data.errors import DataError, LoadReport, check_on_error, handle_bad_row, log_summary


class Row:
    """One record plus its location; typed field accessors raise `DataError`."""

    def __init__(self, path, row: int, row_kind: str, obj: Any):
        self.path = str(path)
        self.row = row
        self.row_kind = row_kind
        self.obj = obj

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.path, self.row, field, message, self.row_kind)

    def check_object(self) -> dict:
        if not isinstance(self.obj, dict):
            raise self.error(None, f"expected an object with named fields, got {type(self.obj).__name__}")
        return self.obj

    def has(self, field: str) -> bool:
        return field in self.check_object() and self.obj[field] is not None

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        """A required string field; whitespace-only counts as empty."""
        obj = self.check_object()
        if field not in obj or obj[field] is None:
            raise self.error(field, "missing field")
        value = obj[field]
        if not isinstance(value, str):
            raise self.error(field, f"expected text, got {type(value).__name__} {value!r:.60}")
        if not allow_empty and not value.strip():
            raise self.error(field, "empty text")
        return value

    def optional_text(self, field: str) -> str:
        return self.text(field, allow_empty=True) if self.has(field) else ""

    def answer_text(self, field: str) -> str:
        """A required answer: text, or a JSON number (written as text)."""
        obj = self.check_object()
        value = obj.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return self.text(field).strip()

    def text_list(self, field: str) -> list[str]:
        """A required non-empty list of non-empty strings."""
        obj = self.check_object()
        if field not in obj or obj[field] is None:
            raise self.error(field, "missing field")
        value = obj[field]
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of text, got {type(value).__name__}")
        if not value:
            raise self.error(field, "empty list")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise self.error(field, f"expected non-empty text items, got {item!r:.60}")
        return [item.strip() for item in value]

    def integer(self, field: str) -> int:
        """An integer given as a JSON number or as text such as '3'."""
        obj = self.check_object()
        if field not in obj or obj[field] is None:
            raise self.error(field, "missing field")
        value = obj[field]
        if isinstance(value, bool):
            raise self.error(field, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        raise self.error(field, f"expected an integer, got {value!r:.60}")


def _check_exists(path: pathlib.Path) -> None:
    if not path.is_file():
        raise DataError(path, None, None, "file not found")


def read_json_array(path) -> Iterator[Row]:
    """Rows of a JSON document that is a list of objects (row = 1-based item)."""
    path = pathlib.Path(path)
    _check_exists(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})", "line") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        yield Row(path, i + 1, "item", obj)


def read_jsonl(path, on_error: str, report: LoadReport) -> Iterator[Row]:
    """Rows of a JSON-lines file (row = 1-based line); blank lines are ignored."""
    path = pathlib.Path(path)
    _check_exists(path)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.rows_read += 1
                handle_bad_row(DataError(path, line_no, None, f"invalid JSON: {e.msg}", "line"), on_error, report)
                continue
            yield Row(path, line_no, "line", obj)


def read_csv(path, required_columns: tuple[str, ...], on_error: str, report: LoadReport) -> Iterator[Row]:
    """Rows of a CSV file with a header (row = 1-based line where the record starts)."""
    path = pathlib.Path(path)
    _check_exists(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, 1, None, "empty file: no CSV header") from None
        header = [h.strip() for h in header]
        for column in required_columns:
            if column not in header:
                raise DataError(path, 1, column, f"missing column in CSV header {header}", "line")
        start_line = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                report.rows_read += 1
                handle_bad_row(DataError(path, start_line, None, f"malformed CSV: {e}", "line"), on_error, report)
                start_line = reader.line_num + 1
                continue
            line_no, start_line = start_line, reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                report.rows_read += 1
                error = DataError(
                    path, line_no, None,
                    f"malformed CSV line: {len(values)} values for {len(header)} columns", "line",
                )
                handle_bad_row(error, on_error, report)
                continue
            yield Row(path, line_no, "line", dict(zip(header, values)))


def example_id(row: Row) -> str:
    """Stable id from the file name and row: ids in user files are often not unique."""
    return f"{pathlib.Path(row.path).stem}-{row.row:06d}"


def collect(path, on_error: str, read_rows, parse_row) -> tuple[list[dict], LoadReport]:
    """Parse every row with `parse_row`; bad rows raise or are skipped and counted.

    `read_rows(path, on_error, report)` yields `Row`s.
    """
    path = pathlib.Path(path)
    check_on_error(on_error)
    report = LoadReport(str(path))
    examples = []
    for row in read_rows(path, on_error, report):
        report.rows_read += 1
        try:
            examples.append(parse_row(row))
        except DataError as e:
            handle_bad_row(e, on_error, report)
    log_summary(report)
    return examples, report


def read_json_or_jsonl(path, on_error: str, report: LoadReport) -> Iterator[Row]:
    """A JSON list for `.json` files, one object per line otherwise."""
    if pathlib.Path(path).suffix == ".json":
        return read_json_array(path)
    return read_jsonl(path, on_error, report)
