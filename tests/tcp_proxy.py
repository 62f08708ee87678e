"""A loopback TCP proxy in front of the S3 endpoint that a test can switch off and on.

Switched off (`refuse`), its port is closed, so a new connection is refused, and
every open connection is reset: what a client sees while a MinIO pod restarts.
Switched on (`accept`), it listens on the same port again. 127.0.0.1 only.

With `strip` (header names), it reads each HTTP request and forwards it without
those headers: `strip={"if-none-match", "if-match"}` makes moto an S3-compatible
server that accepts conditional writes and overwrites anyway. (The headers are
signed, but moto checks signatures only while IAM is enforced; these tests do not.)
"""
from __future__ import annotations

import socket
import struct
import threading

from tests.s3_fixtures import free_port


class TcpProxy:
    def __init__(self, target_port: int, strip: set[str] = frozenset()):
        self.target = ("127.0.0.1", target_port)
        self.strip = {name.lower().encode() for name in strip}
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def accept(self) -> None:
        """Listen (again) on the same port."""
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self._listener = s
        threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def refuse(self) -> None:
        """Close the port (new connections: refused) and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._open = self._open, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        for c in conns:
            _reset(c)

    close = refuse

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refused: the listener is closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # switched off meanwhile
                    _reset(client), _reset(upstream)
                    continue
                self._open |= {client, upstream}
            requests = self._pump_requests if self.strip else self._pump
            threading.Thread(target=requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._end(src, dst)

    def _pump_requests(self, src: socket.socket, dst: socket.socket) -> None:
        """Client to server, one HTTP/1.1 request at a time, each without the `strip` headers."""
        r = _Reader(src)
        try:
            while head := r.until(b"\r\n\r\n"):
                lines = head.split(b"\r\n")
                fields = {ln.partition(b":")[0].strip().lower(): ln.partition(b":")[2].strip() for ln in lines[1:]}
                kept = [lines[0]] + [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in self.strip]
                dst.sendall(b"\r\n".join(kept))  # `head` ends with the blank line
                if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                    while True:  # size line, data and CRLF; a 0 size, then trailers up to a blank line
                        line = r.until(b"\r\n")
                        dst.sendall(line)
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while (trailer := r.until(b"\r\n")) != b"\r\n":
                                dst.sendall(trailer)
                            dst.sendall(trailer)
                            break
                        dst.sendall(r.exactly(size + 2))
                else:
                    dst.sendall(r.exactly(int(fields.get(b"content-length", b"0"))))
        except (OSError, EOFError, ValueError):  # closed, or cut off mid-request
            pass
        self._end(src, dst)

    def _end(self, src: socket.socket, dst: socket.socket) -> None:
        # one side is done (moto closes after every response): end both
        for s in (src, dst):
            with self._lock:
                self._open.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class _Reader:
    """Buffered reads from a socket: up to and including a delimiter, or exactly n bytes."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, delimiter: bytes) -> bytes:
        """Everything up to and including `delimiter`; b"" if the peer closed between requests."""
        while delimiter not in self.buf:
            try:
                self._more()
            except EOFError:
                if self.buf:
                    raise
                return b""
        i = self.buf.index(delimiter) + len(delimiter)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _reset(s: socket.socket) -> None:
    """Close `s` with an RST rather than a FIN, as a crashed server's kernel would."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)  # wakes a thread blocked in recv() on it
    except OSError:
        pass
    s.close()
