"""The port forwarder: host TCP ports to guests inside the stack's network namespace.

Run as ``python -m vmrun.proc.forward SPEC`` (a ForwarderSpec, vmrun.protocol) by the
supervisor, which has already bound the listening sockets on the host (so a port in use
fails before anything starts) and passes them as inherited file descriptors.  The
forwarder then enters the stack's network namespace: every socket it creates from there
on, the ones that connect to guests, lives in that namespace, while the inherited
listeners stay on the host.  It dies with the supervisor (PR_SET_PDEATHSIG).  Each
connection is relayed by two threads, one per direction, with half-close passed on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading

from vmrun import _fastsig
from vmrun.protocol import ForwarderSpec

CONNECT_TIMEOUT = 10.0


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _serve_connection(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        print(f"vmrun forward: {target[0]}:{target[1]}: {exc}", file=sys.stderr, flush=True)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _accept_loop(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serve_connection, args=(client, target), daemon=True).start()


def main(argv: list[str]) -> int:
    spec = ForwarderSpec.from_json(argv[1])
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not _fastsig.set_pdeathsig(signal.SIGTERM, spec.supervisor_pid):
        return 1
    listeners = [(socket.socket(fileno=entry.fd), (entry.ip, entry.port))
                 for entry in spec.forwards]
    fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
    _fastsig.enter_netns(fd)  # before any thread: they all inherit the namespace
    os.close(fd)
    threads = [threading.Thread(target=_accept_loop, args=pair, daemon=True)
               for pair in listeners]
    for thread in threads:
        thread.start()
    print("vmrun forward: ready", file=sys.stderr, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
