"""Running the app: `run` (the CLI's foreground server) and `ServerThread` (tests and benchmarks:
uvicorn on a free loopback port in a background thread, shut down on exit)."""

from __future__ import annotations

import threading
import time

import uvicorn


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> BaseException | None:
    """Serve until Ctrl-C / SIGTERM, or until the engine cannot load (or reload): then shut down and
    return that error (the CLI prints it and exits 1, as vLLM's and llama.cpp's servers do)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                          timeout_graceful_shutdown=5))
    state = app.state.qiusuo
    fatal: list[BaseException] = []

    def stop(error: BaseException) -> None:
        fatal.append(error)
        server.should_exit = True  # uvicorn's main loop polls it

    state.on_fatal = stop
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    return fatal[0] if fatal else None


class ServerThread:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout: float = 60.0):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.startup_timeout = startup_timeout
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see its log above")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
