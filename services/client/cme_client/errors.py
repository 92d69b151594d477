"""The library's exceptions. Every one of them is a `ClientError`."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of the errors this library raises."""


class ProtocolError(ClientError):
    """The server sent something the protocol does not allow (the library cannot trust its state)."""


class SequenceGap(ProtocolError):
    """An l2_update did not follow on from the book's seq: the book must be resynchronised."""


class Disconnected(ClientError, ConnectionError):
    """The connection ended before the answer came. For an order this means it may or may not have
    been queued: its execution reports (delivered after a reconnect) tell which."""


class Rejected(ClientError):
    """The venue refused a request: `code` is the stable reject code (INVALID_PRICE, UNKNOWN_ORDER,
    ...), `reason` the human text, `message` the whole reject message."""

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self.code: str = str(message.get("code"))
        self.reason: str = str(message.get("reason", ""))
        self.op: str | None = message.get("op")
        self.client_order_id: str | None = message.get("client_order_id")
        super().__init__(f"{self.code}: {self.reason}")
