"""cme_client: the asyncio Python client of the crypto-matching-engine exchange.

    from cme_client import Client

    async with Client("ws://127.0.0.1:8000", account="alice") as client:
        ack = await client.place("BTC-USDT", "buy", "0.5", price="30000.00")
        async for report in client.execution_reports():
            ...

`Client` is the API for applications (orders, reports, book, trades, reconnect with resume);
`Connection` is the low-level recording connection for tools and tests; `L2Book` a local book;
`WebSocket` the lean transport under all of them. The guide is docs/client.md.
"""

from .book import L2Book
from .client import CandleStream, Client, L2Stream, TradeStream, decimal_text
from .connection import (
    Connection,
    Message,
    Predicate,
    gateway_session,
    is_answer,
    is_type,
    l2_snapshot,
    subscribe,
)
from .errors import ClientError, Disconnected, ProtocolError, Rejected, SequenceGap
from .transport import HandshakeError, WebSocket

__all__ = [
    "CandleStream",
    "Client",
    "ClientError",
    "Connection",
    "Disconnected",
    "HandshakeError",
    "L2Book",
    "L2Stream",
    "Message",
    "Predicate",
    "ProtocolError",
    "Rejected",
    "SequenceGap",
    "TradeStream",
    "WebSocket",
    "decimal_text",
    "gateway_session",
    "is_answer",
    "is_type",
    "l2_snapshot",
    "subscribe",
]
