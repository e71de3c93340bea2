"""Run the app under uvicorn in a background thread on a free localhost port (benchmarks and tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from refrag.errors import RefragError
from refrag.serve.app import ServeOptions, create_app
from refrag.serve.engine import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_server(engine: Engine, options: ServeOptions = ServeOptions(), *, startup_s: float = 30.0) -> Iterator[str]:
    """Serve ``engine`` on 127.0.0.1 until the block ends (graceful stop); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, options), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, name="refrag-uvicorn", daemon=True)
    thread.start()
    deadline = time.perf_counter() + startup_s
    while not server.started:
        if not thread.is_alive() or time.perf_counter() > deadline:
            raise RefragError(f"the local server did not start on port {port}.")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
