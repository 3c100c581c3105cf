"""BASELINE ONLY: the Sparse prototype's transport, rebuilt to measure against.

.. warning::
   This module reproduces the **insecure design that sparse-zmq replaced**. It
   unpickles whatever arrives on its socket, so anyone who can connect can run
   code in the process. It exists only so that ``python -m bench.transport``
   can put a number on the old design; it binds to loopback only, and no
   library module may import it.

The seed paper's prototype (Sparse, implementation section) talks RPC over
asyncio streams:

* the master's task deployer opens a **new TCP connection for every task**,
  writes the request, half-closes its side (EOF marks the end of the
  request), and reads the reply until the worker closes the connection;
* the worker's RX pipe is an asyncio server: it reads one request to EOF,
  runs the task, writes the reply, and closes the connection;
* request and reply are dictionaries **pickled** whole, tensors included
  (``{"activation", "labels"}`` on the way in, ``{"gradient", "loss"}`` on
  the way back), so each side serialises and deserialises every byte.

This rebuild follows that design step for step, written afresh. Where the
prototype left a choice, the faster option is taken so that the baseline is
not a straw man: one event loop serves all of a master's tasks (several
tasks share it when more than one is in flight), and the worker's task is an
echo that costs nothing, so only the transport is measured.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import pickle  # noqa: S403 - the baseline's own insecure wire format, see above
import signal

import torch

__all__ = [
    "LOOPBACK",
    "SeedClient",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "serve",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
"""The only address the baseline binds to or connects to."""


def encode_request(activation: torch.Tensor, labels: torch.Tensor) -> bytes:
    """Pickle a training request the prototype's way."""
    return pickle.dumps({"activation": activation, "labels": labels})


def decode_request(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpickle a training request (trusts its input: loopback baseline only)."""
    payload = pickle.loads(data)  # noqa: S301 - the baseline's insecure design
    return payload["activation"], payload["labels"]


def encode_response(gradient: torch.Tensor, loss: float) -> bytes:
    """Pickle a training reply the prototype's way."""
    return pickle.dumps({"gradient": gradient, "loss": loss})


def decode_response(data: bytes) -> tuple[torch.Tensor, float]:
    """Unpickle a training reply (trusts its input: loopback baseline only)."""
    payload = pickle.loads(data)  # noqa: S301 - the baseline's insecure design
    return payload["gradient"], payload["loss"]


async def _rx_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one task on its own connection: read to EOF, echo, close."""
    try:
        activation, _labels = decode_request(await reader.read())
        writer.write(encode_response(activation, 0.0))
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def _serve_forever(conn: multiprocessing.connection.Connection) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(_rx_pipe, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    conn.send((LOOPBACK, port))
    conn.close()
    async with server:
        await stop.wait()
    logger.info("seed baseline worker on port %d stopping", port)


def serve(conn: multiprocessing.connection.Connection) -> None:
    """Run the baseline worker in this process until SIGTERM.

    Sends ``(host, port)`` through ``conn`` once it listens on loopback.
    """
    asyncio.run(_serve_forever(conn))


class SeedClient:
    """The prototype's task deployer: one new connection per task.

    Args:
        host: The worker's address; must be loopback.
        port: The worker's port.

    Raises:
        ValueError: ``host`` is not the loopback address.
    """

    def __init__(self, host: str, port: int) -> None:
        if host != LOOPBACK:
            raise ValueError(
                f"the seed baseline only talks to {LOOPBACK}, got {host!r}"
            )
        self.host = host
        self.port = port

    async def offload(self, data: bytes) -> bytes:
        """Send one pickled request on a fresh connection and read the reply to EOF."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            writer.write_eof()
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def train(
        self, activation: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """One training task: pickle, offload, unpickle."""
        return decode_response(await self.offload(encode_request(activation, labels)))
