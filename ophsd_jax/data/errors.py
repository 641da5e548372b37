"""Errors and skip accounting for user-supplied data files.

Every problem with a data file is reported with the file, the row and the
field, so a user can open the file and fix it. Loaders either raise
(`on_error="raise"`, the default) or skip the bad row and count it
(`on_error="skip"`); skipped rows are logged and kept in a `LoadReport`.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
# Log the first few skipped rows one by one; after that only the summary.
_MAX_LOGGED_SKIPS = 10


class DataError(ValueError):
    """A bad row or file. `row` is 1-based (JSON item number, JSONL/CSV line)."""

    def __init__(self, path, row: int | None, field: str | None, message: str, row_kind: str = "row"):
        self.path = str(path)
        self.row = row
        self.field = field
        self.message = message
        self.row_kind = row_kind
        where = self.path
        if row is not None:
            where += f", {row_kind} {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class LoadReport:
    """What a loader read and what it skipped (one entry per skipped row)."""

    path: str
    rows_read: int = 0
    skipped: list[DataError] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "num_skipped": self.num_skipped,
            "skipped": [str(e) for e in self.skipped],
        }


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


def handle_bad_row(error: DataError, on_error: str, report: LoadReport) -> None:
    """Raise `error`, or record and log it as a skip, as `on_error` says."""
    if on_error == "raise":
        raise error
    report.skipped.append(error)
    if report.num_skipped <= _MAX_LOGGED_SKIPS:
        logger.warning("skipping bad row: %s", error)


def log_summary(report: LoadReport) -> None:
    if report.num_skipped:
        logger.warning(
            "%s: skipped %d of %d rows (see LoadReport.skipped)",
            report.path, report.num_skipped, report.rows_read,
        )
    else:
        logger.info("%s: loaded %d rows", report.path, report.rows_read)
