#!/usr/bin/env python3
"""Captures an upgraded kubectl <-> kube-apiserver session as the SPDY fixtures here are kept.

A TLS man-in-the-middle for the dev cluster only: kubectl talks HTTP/1.1 to 127.0.0.1:LISTEN
(give it a kubeconfig with insecure-skip-tls-verify and the admin token), this forwards to the
API server and logs each read as `C|S LEN(4, big-endian) BYTES`. The connection that carried
`Upgrade: SPDY/3.1` is written, HTTP heads removed (they hold the bearer token), to OUT.

    spdy_capture.py LISTEN UPSTREAM_PORT OUT CERT KEY

One thread per connection touches both of its TLS objects (OpenSSL objects must not be read and
written from two threads at once), and a half-close is the plain socket's: SSLSocket.shutdown
drops the TLS object, and the peer's later records would then be logged as ciphertext.
"""
import os
import select
import socket
import ssl
import sys
import threading

listen_port, upstream_port, out, cert, key = sys.argv[1:6]
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(cert, key)
server_ctx.set_alpn_protocols(["http/1.1"])
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.check_hostname = False
client_ctx.verify_mode = ssl.CERT_NONE
client_ctx.set_alpn_protocols(["http/1.1"])


def relay(c, u):
    log, head, seen_head = [], {c: b"", u: b""}, {c: False, u: False}
    tag, peer, open_ = {c: b"C", u: b"S"}, {c: u, u: c}, {c, u}
    c.setblocking(False)
    u.setblocking(False)
    while open_:
        ready = [s for s in open_ if s.pending()] or select.select(list(open_), [], [])[0]
        for s in ready:
            try:
                data = s.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            except OSError:
                data = b""
            if not data:
                open_.discard(s)
                try:
                    socket.socket.shutdown(peer[s], socket.SHUT_WR)
                except OSError:
                    pass
                continue
            sent = data
            if not seen_head[s]:
                head[s] += data
                end = head[s].find(b"\r\n\r\n")
                data = b""
                if end >= 0:
                    seen_head[s], data = True, head[s][end + 4:]
            if data:
                log.append((tag[s], data))
            try:
                peer[s].setblocking(True)
                peer[s].sendall(sent)
                peer[s].setblocking(False)
            except OSError:
                # The other side is gone: what was read is logged, the session is over.
                open_.clear()
    return head[c], log


def serve(raw):
    try:
        c = server_ctx.wrap_socket(raw, server_side=True)
        u = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(upstream_port))))
    except (OSError, ssl.SSLError):
        return
    request, log = relay(c, u)
    c.close()
    u.close()
    if b"\r\nUpgrade: SPDY/3.1" in request:
        with open(out, "wb") as f:
            for t, data in log:
                f.write(t + len(data).to_bytes(4, "big") + data)
        os._exit(0)


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(listen_port)))
listener.listen(16)
while True:
    raw, _ = listener.accept()
    # A thread per connection (kubectl keeps several open); each touches only its own two.
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
