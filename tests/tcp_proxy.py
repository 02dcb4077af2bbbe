"""A TCP forwarder that can be switched off and on: an outage of the server behind it, whose state survives.

Stopping a moto S3 server would lose its buckets; putting this in front of it and switching it off makes the store
unreachable (connection refused, open connections cut), as a network partition or a down endpoint does, and
switching it on again brings back the same store.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class SwitchableProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` while on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def on(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def off(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # switched off
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # switched off meanwhile
                    client.close()
                    upstream.close()
                    return
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:  # the connection was cut (switched off, or the peer went away): end both sides below
            pass
        finally:  # one side ended: end the other too; each pump closes the socket it read from
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            source.close()
            with self._lock:
                self._connections.discard(source)


def through(uri: str, port: int) -> str:
    """An object-store URI with its endpoint_override pointed at 127.0.0.1:`port` (a SwitchableProxy)."""
    head, _, query = uri.partition("?")
    options = [o for o in query.split("&") if o and not o.startswith("endpoint_override=")]
    return head + "?" + "&".join([*options, f"endpoint_override=http://127.0.0.1:{port}"])
