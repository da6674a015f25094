"""The ``atls://`` Dask comm backend: TLS 1.3 where both ends verify the other's evidence before any Dask byte.

It is Dask's own TLS transport (``distributed.comm.tcp``) with one step added on each side. The connector, once
the handshake is done, reads the server's certificate (``getpeercert(binary_form=True)``) and runs
:meth:`ClusterNode.admit`; only then does it hand the comm to Dask, which writes its handshake. The listener does
the same with the client's certificate before Dask sees the stream. A refusal is the failing check's typed
:class:`~mesatee_notebook.errors.AttestationError` on the connecting side (Dask does not retry it) and a logged
warning with a closed stream on the listening side.

The node and its contexts reach the backend through Dask's connection arguments, from :class:`AttestedSecurity`.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.comm import registry
from distributed.comm.tcp import TLS, BaseTCPBackend, TLSConnector, TLSListener
from distributed.security import Security

from mesatee_notebook.enclave.cluster.node_identity import ClusterNode
from mesatee_notebook.errors import AttestationError

__all__ = ["SCHEME", "AttestedBackend", "AttestedConnector", "AttestedListener", "AttestedSecurity", "register"]

SCHEME = "atls"
log = logging.getLogger("mesatee.cluster")


def _node_of(connection_args: dict[str, Any]) -> ClusterNode:
    node = connection_args.get("mesatee_node")
    if not isinstance(node, ClusterNode):
        msg = "atls:// needs a mesatee cluster node's security (AttestedSecurity), not Dask's TLS settings"
        raise TypeError(msg)
    return node


def _peer_certificate(stream: Any) -> bytes | None:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    der = sock.getpeercert(binary_form=True)
    return bytes(der) if der else None


class AttestedConnector(TLSConnector):  # type: ignore[misc]
    """Connects over TLS, then admits the server by its evidence before returning the comm."""

    prefix = f"{SCHEME}://"
    comm_class = TLS
    encrypted = True

    def _get_connect_args(self, **connection_args: Any) -> dict[str, Any]:
        return {"ssl_options": _node_of(connection_args).identity.client_context}

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Any:
        node = _node_of(connection_args)
        comm = await super().connect(address, deserialize, **connection_args)
        try:
            node.admit(_peer_certificate(comm.stream), self.prefix + address, "outgoing")
        except AttestationError:
            comm.abort()
            raise
        return comm


class AttestedListener(TLSListener):  # type: ignore[misc]
    """Accepts TLS, then admits the client by its evidence before Dask reads or writes a byte."""

    prefix = f"{SCHEME}://"
    comm_class = TLS
    encrypted = True

    def _get_server_args(self, **connection_args: Any) -> dict[str, Any]:
        self._node = _node_of(connection_args)
        return {"ssl_options": self._node.identity.server_context}

    async def _prepare_stream(self, stream: Any, address: str) -> Any:
        stream = await super()._prepare_stream(stream, address)
        if stream is None:  # the TLS handshake failed (Dask logged it)
            return None
        try:
            self._node.admit(_peer_certificate(stream), address, "incoming")
        except AttestationError:
            stream.close()
            return None
        return stream


class AttestedBackend(BaseTCPBackend):  # type: ignore[misc]
    """``atls://HOST:PORT``."""

    _connector_class = AttestedConnector
    _listener_class = AttestedListener


class AttestedSecurity(Security):  # type: ignore[misc]
    """Dask security that hands the node (identity, policy) to the ``atls`` backend; plaintext comms are refused."""

    def __init__(self, node: ClusterNode) -> None:
        super().__init__(require_encryption=True)
        self.node = node

    def _args(self, server: bool) -> dict[str, Any]:
        ident = self.node.identity
        return {
            "ssl_context": ident.server_context if server else ident.client_context,
            "require_encryption": True,
            "extra_conn_args": {},
            "mesatee_node": self.node,
        }

    def get_connection_args(self, role: str) -> dict[str, Any]:
        return self._args(server=False)

    def get_listen_args(self, role: str) -> dict[str, Any]:
        return self._args(server=True)


def register() -> None:
    """Register ``atls`` with Dask (also declared as a ``distributed.comm.backends`` entry point)."""
    registry.backends.setdefault(SCHEME, AttestedBackend())


register()
