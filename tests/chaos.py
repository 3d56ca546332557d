"""Fault injectors for the fault campaign, in the style of Ray's own chaos tests.

- :class:`TcpProxy`: sits between synth and the S3 server; ``down()`` refuses new connections and
  cuts open ones (an outage, as clients see a dead server), ``up()`` serves again. The server
  behind it keeps its objects, which a restarted in-memory S3 server would not.
- :func:`wait_for`: poll until a condition holds (a shard landed, a process appeared).

Processes to kill are found with ``conftest.ray_processes`` (this test process's own Ray workers).
"""

from __future__ import annotations

import socket
import threading
import time


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.host, self.target_port = host, target_port
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._listener = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
            except OSError:
                pass
            listener.close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                except OSError:
                    pass
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
            with self._lock:
                self._open -= {src, dst}


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class KillWhen:
    """Around the faulted work: SIGKILL the processes ``find()`` returns once ``ready()`` gives a mark.

    ``ready()`` returns None until the moment has come (e.g. the first checkpoint registered),
    then a mark of it (the epoch), kept in ``mark``; ``killed`` lists the processes it killed.
    A watcher thread polls every 50 ms for at most ``timeout`` seconds and stops when the
    ``with`` block ends, so a kill that never landed shows as an empty ``killed``.
    """

    def __init__(self, ready, find, timeout: float):
        self.ready, self.find, self.timeout = ready, find, timeout
        self.mark, self.killed = None, []
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._done.is_set() and time.monotonic() < deadline:
            mark = self.ready()
            if mark is not None:  # the work goes on: the kill lands after this mark
                self.mark, self.killed = mark, self.find()
                for process in self.killed:
                    process.kill()
                return
            time.sleep(0.05)

    def __enter__(self) -> "KillWhen":
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._watcher.join(timeout=10)

    def __repr__(self) -> str:
        return f"KillWhen(mark={self.mark}, killed={[p.pid for p in self.killed]})"
