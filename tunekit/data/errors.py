"""The one exception type for bad training data."""

from __future__ import annotations

import functools

from tunekit.config.errors import UserError


class DataError(UserError):
    """A row of a dataset is malformed.

    The message names where the problem is (``file:line`` or ``file record N``), the field and what
    is wrong, e.g. ``train.jsonl:17: field 'conversations[2].from': unknown role 'bot'``.
    Transforms raise it without a location; the dataset adds the location with :meth:`at`.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        self.reason = message
        self.where = where
        self.field = field
        parts = [p for p in (where, f"field {field!r}" if field else None, message) if p]
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep location and field across processes (packing workers)
        return functools.partial(DataError, where=self.where, field=self.field), (self.reason,)

    def at(self, where: str) -> "DataError":
        """The same error located at ``where`` (kept as-is when it already has a location)."""
        if self.where is not None:
            return self
        return DataError(self.reason, where=where, field=self.field)
