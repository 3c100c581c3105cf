"""CURVE encryption and authentication for the tcp endpoints of a pipeline.

Every broker ROUTER (frontend and backend) can be made a CURVE server, and
every master and worker DEALER that connects to one a CURVE client. Traffic
is then encrypted, and a ZAP handler (pyzmq's
:class:`zmq.auth.thread.ThreadAuthenticator`) lets a client complete the
handshake only when its public key is on the broker's list. A client without
keys, or with a key not on the list, never gets a message through: its
handshake fails before the broker reads anything from it.

CURVE is off unless configured (:class:`CurveConfig`). Turn it on with one key
folder made by ``sparse-zmq keys DIR --name NAME ...``::

    DIR/server.key            the brokers' public key: every client needs it
    DIR/server.key_secret     the brokers' key pair: broker hosts only (0600)
    DIR/authorized/NAME.key   public key of each client the brokers accept
    DIR/NAME.key              a client's public key
    DIR/NAME.key_secret       a client's key pair: that client's host only (0600)

and give ``--curve-keys DIR`` to ``sparse-zmq broker``, ``stage`` and
``source`` (a client picks its pair with ``--curve-name``, by default its
``--node`` name), or run a whole suite with ``sparse-zmq run SUITE --curve``.
A broker host needs only the server pair and ``authorized/``; a client host
only ``server.key`` and its own pair. Removing a key from ``authorized/``
revokes that client from the next broker start on.

Not covered: the monitor's ipc sockets. An ipc endpoint is a socket file in
the run folder, reachable only by processes on the same host that the file
permissions admit; its records never cross a network. Default binds of the
launcher are loopback (``tcp://127.0.0.1``); ``sparse-zmq broker`` warns when
it binds another address without CURVE.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from sparse_zmq.errors import ConfigError

__all__ = [
    "AUTHORIZED_FOLDER",
    "SERVER_NAME",
    "CurveConfig",
    "ServerGuard",
    "generate_keys",
    "is_loopback",
    "secure_client",
    "secure_server",
    "warn_if_exposed",
]

logger = logging.getLogger(__name__)

SERVER_NAME = "server"
"""Base name of the brokers' key pair in a key folder."""

AUTHORIZED_FOLDER = "authorized"
"""Sub-folder of a key folder holding the public keys brokers accept."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# A denied client reconnects every reconnect interval (100 ms by default), so
# only the first denial and every this-many-th after it are logged as warnings.
_DENIAL_LOG_EVERY = 100


@dataclass(frozen=True)
class CurveConfig:
    """Where a process finds its CURVE keys.

    A broker needs ``server_secret_file`` and ``authorized_dir``; a master or
    worker needs ``client_secret_file`` and ``server_public_file``. Files are
    read when a socket is secured, so one config may serve both roles.

    Attributes:
        server_secret_file: The brokers' key pair (``server.key_secret``).
        authorized_dir: Folder of ``*.key`` files, one per accepted client.
        client_secret_file: This client's key pair (``NAME.key_secret``).
        server_public_file: The brokers' public key (``server.key``).
    """

    server_secret_file: Path | None = None
    authorized_dir: Path | None = None
    client_secret_file: Path | None = None
    server_public_file: Path | None = None

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], name: str | None = None
    ) -> CurveConfig:
        """The config for a key folder laid out by :func:`generate_keys`.

        Args:
            folder: The key folder.
            name: This client's key pair name; None for a broker.

        Raises:
            ConfigError: ``name`` is not a valid key name.
        """
        folder = Path(folder)
        client = None
        if name is not None:
            _check_name(name)
            client = folder / f"{name}.key_secret"
        return cls(
            server_secret_file=folder / f"{SERVER_NAME}.key_secret",
            authorized_dir=folder / AUTHORIZED_FOLDER,
            client_secret_file=client,
            server_public_file=folder / f"{SERVER_NAME}.key",
        )


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name == SERVER_NAME:
        raise ConfigError(
            f"key name {name!r} not allowed: use 1-64 letters, digits, '_', '.' or "
            f"'-', starting with a letter or digit, and not {SERVER_NAME!r}"
        )


def _need(path: Path | None, field: str, role: str) -> Path:
    if path is None:
        raise ConfigError(f"CURVE for a {role} needs CurveConfig.{field}, got None")
    return path


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    """Read a key pair file; warn when others may read it."""
    try:
        public, secret = zmq.auth.load_certificate(path)
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key pair {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(
            f"{path} holds no secret key; expected a '.key_secret' file made by "
            "'sparse-zmq keys'"
        )
    if stat.S_IMODE(mode) & 0o077:
        logger.warning(
            "secret key %s has mode %o: others may read it; chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return public, secret


def _load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE public key {path}: {exc}") from exc
    return public


def _load_authorized(folder: Path) -> frozenset[bytes]:
    try:
        keys = zmq.auth.load_certificates(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the accepted client keys in {folder}: {exc}"
        ) from exc
    if not keys:
        logger.warning("no client keys in %s: every client will be refused", folder)
    return frozenset(keys)


class _KeyList:
    """ZAP credentials provider: accepts the public keys of one folder."""

    def __init__(self, folder: Path, keys: frozenset[bytes]) -> None:
        self.folder = folder
        self.keys = keys
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP thread for each CURVE handshake (``key`` in Z85)."""
        if key in self.keys:
            logger.debug("CURVE client %s accepted (%s)", key.decode(), self.folder)
            return True
        self.denied += 1
        if self.denied == 1 or self.denied % _DENIAL_LOG_EVERY == 0:
            logger.warning(
                "CURVE client %s refused: not in %s (%d refusals so far)",
                key.decode(errors="replace"),
                self.folder,
                self.denied,
            )
        return False


class _Zap:
    """One ZAP handler per context, shared by that context's CURVE servers."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self.authenticator = ThreadAuthenticator(
            context, log=logging.getLogger(f"{__name__}.zap")
        )
        self.authenticator.start()
        self.holders = 0
        self.domains: dict[str, _KeyList] = {}


_zaps: dict[int, _Zap] = {}
_zaps_lock = threading.Lock()


class ServerGuard:
    """A CURVE server socket's hold on its context's ZAP handler.

    Release it once the socket is closed and before its context is
    terminated; the last release stops the handler.
    """

    def __init__(self, context_key: int, keys: _KeyList) -> None:
        self._context_key = context_key
        self._keys = keys
        self._released = False

    @property
    def denied(self) -> int:
        """Handshakes refused so far for this socket's list of keys."""
        return self._keys.denied

    def release(self) -> None:
        """Drop the hold (idempotent); the last one stops the ZAP handler."""
        with _zaps_lock:
            if self._released:
                return
            self._released = True
            zap = _zaps[self._context_key]
            zap.holders -= 1
            if zap.holders:
                return
            del _zaps[self._context_key]
        zap.authenticator.stop()


def secure_server(socket: zmq.Socket[Any], config: CurveConfig) -> ServerGuard:
    """Make ``socket`` a CURVE server accepting only the configured client keys.

    Call it after creating the socket and before binding it.

    Args:
        socket: A socket that will bind (a broker ROUTER).
        config: Needs ``server_secret_file`` and ``authorized_dir``.

    Returns:
        The socket's hold on the ZAP handler; release it after closing the
        socket and before terminating its context.

    Raises:
        ConfigError: A key file or the key folder is missing or unreadable.
    """
    # Read every file before touching the socket or the shared handler.
    public, secret = _load_pair(
        _need(config.server_secret_file, "server_secret_file", "broker")
    )
    folder = _need(config.authorized_dir, "authorized_dir", "broker").resolve()
    keys = _load_authorized(folder)
    domain = f"sparse-zmq:{folder}"

    context = socket.context
    with _zaps_lock:
        zap = _zaps.get(id(context))
        if zap is None:
            zap = _zaps[id(context)] = _Zap(context)
        key_list = zap.domains.get(domain)
        if key_list is None:
            key_list = zap.domains[domain] = _KeyList(folder, keys)
            zap.authenticator.configure_curve_callback(domain, key_list)
        else:
            key_list.keys = keys
        zap.holders += 1

    socket.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    logger.info("CURVE server socket, %d accepted client keys in %s", len(keys), folder)
    return ServerGuard(id(context), key_list)


def secure_client(socket: zmq.Socket[Any], config: CurveConfig) -> None:
    """Make ``socket`` a CURVE client of the brokers; call before connecting it.

    Args:
        socket: A socket that will connect to a broker (a DEALER).
        config: Needs ``client_secret_file`` and ``server_public_file``.

    Raises:
        ConfigError: A key file is missing or unreadable.
    """
    pair = _need(config.client_secret_file, "client_secret_file", "client")
    public, secret = _load_pair(pair)
    server = _load_public(
        _need(config.server_public_file, "server_public_file", "client")
    )
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SERVERKEY, server)
    logger.debug("CURVE client socket with key pair %s", pair)


def generate_keys(
    folder: str | os.PathLike[str], names: Iterable[str] = ()
) -> list[Path]:
    """Create the brokers' key pair and one pair per client name in ``folder``.

    Existing pairs are kept, never overwritten, so the command can be run
    again to add clients. A new client's public key is also copied into
    ``authorized/``. Secret key files are created with mode 0600 inside a
    private temporary folder and then moved into place, so they are never
    readable by others, not even for a moment.

    Args:
        folder: The key folder; created with mode 0700 if missing.
        names: Client names (letters, digits, ``_.-``; not ``server``).

    Returns:
        The files written, in order.

    Raises:
        ConfigError: A name is not allowed, or the folder cannot be written.
    """
    names = list(names)
    for name in names:
        _check_name(name)
    folder = Path(folder)
    written: list[Path] = []
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized = folder / AUTHORIZED_FOLDER
        authorized.mkdir(exist_ok=True)
        for name in [SERVER_NAME, *dict.fromkeys(names)]:
            public = folder / f"{name}.key"
            secret = folder / f"{name}.key_secret"
            if secret.exists():
                logger.info("keeping the existing key pair %s", secret)
                continue
            with tempfile.TemporaryDirectory(dir=folder, prefix=".keys-") as tmp:
                made_public, made_secret = zmq.auth.create_certificates(tmp, name)
                os.chmod(made_secret, 0o600)
                os.chmod(made_public, 0o644)
                os.replace(made_secret, secret)
                os.replace(made_public, public)
            written += [public, secret]
            if name != SERVER_NAME:
                shutil.copyfile(public, authorized / public.name)
                os.chmod(authorized / public.name, 0o644)
                written.append(authorized / public.name)
            logger.info("created key pair %s", secret)
    except OSError as exc:
        raise ConfigError(f"cannot write CURVE keys in {folder}: {exc}") from exc
    return written


def is_loopback(endpoint: str) -> bool:
    """True when ``endpoint`` cannot be reached from another host.

    ``ipc://`` and ``inproc://`` endpoints, and tcp endpoints on ``localhost``
    or a loopback address, are local; wildcards, interface names and any
    other address are not.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(endpoint: str, curve: CurveConfig | None, where: str) -> None:
    """Log a warning when ``endpoint`` is reachable from other hosts without CURVE."""
    if curve is None and not is_loopback(endpoint):
        logger.warning(
            "%s: %s is reachable from other hosts and CURVE is off: anyone who can "
            "reach it may send tasks; see 'sparse-zmq keys' and --curve-keys",
            where,
            endpoint,
        )
