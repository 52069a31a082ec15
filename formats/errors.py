"""The one exception a client's bad input raises, in every room: :class:`InputError`.

It carries what an RFC 9457 problem document needs (HTTP status, title, and
which field, what was expected, what arrived); the service maps it to a
response in one place (``photoz.service.errors``), the pipeline prints it
with the file's name.
"""
from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """A bad input: HTTP ``status`` and the problem's field / expected / received."""

    def __init__(self, field: str, expected: str, received: str, status: int = 422,
                 title: str = "invalid input", headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{field}: expected {expected}, got {received}")
        self.field, self.expected, self.received, self.status, self.title = field, expected, received, status, title
        self.headers = headers  # e.g. Connection: close when the rest of the body will not be read

    def problem(self) -> dict[str, Any]:
        """RFC 9457 problem details."""
        return {"type": "about:blank", "title": self.title, "status": self.status, "detail": str(self),
                "field": self.field, "expected": self.expected, "received": self.received}
