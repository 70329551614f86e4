"""The demo's metrics scraper when a flow process exits in the middle of its answer (a drained
flow stopping while the demo polls it): an OSError the demo's poll loop skips, not a crash."""

import socket
import threading

import pytest

from ops.dev.demo import scrape_url


def test_an_answer_broken_off_by_an_exiting_process_is_a_connection_error():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_half():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 40727\r\n\r\ngatewatch_events_total 3\n")
        conn.close()

    thread = threading.Thread(target=answer_half)
    thread.start()
    try:
        with pytest.raises(ConnectionError, match="broke off its answer"):
            scrape_url(f"http://127.0.0.1:{server.getsockname()[1]}/metrics")
    finally:
        thread.join(5)
        server.close()
