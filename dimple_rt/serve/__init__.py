# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt serve``: an OpenAI-compatible HTTP server for a Runtime.

``app`` holds the FastAPI app and ``schemas`` the OpenAI request/response bodies; ``scheduler`` owns the
Runtime and runs the denoising steps in one worker thread; ``metrics`` renders Prometheus text. :func:`serve`
puts them together behind uvicorn.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

from .app import create_app
from .errors import APIError
from .images import ImageLimits
from .metrics import Metrics
from .scheduler import Scheduler

GRACEFUL_SHUTDOWN_SECONDS = 30.0
"""After SIGTERM/SIGINT: how long in-flight requests may run on before they are answered 503."""


def serve(
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    image_dir: str | Path | None = None,
    timeout: float = 300.0,
    max_images: int = 4,
    backend: str = "kernels",
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    preset: str | None = None,
    shutdown_grace: float = GRACEFUL_SHUTDOWN_SECONDS,
    log_level: str = "info",
) -> int:
    """Load ``model`` (with the Runtime's ``backend``, ``device``, ``dtype``, ``quantize`` and ``preset``: a
    preset's options are every request's defaults) and serve it until SIGTERM/SIGINT; returns 0 after a clean
    shutdown.

    On SIGTERM (or SIGINT) uvicorn stops accepting connections and lets in-flight requests finish; after
    ``shutdown_grace`` seconds the scheduler answers what is still queued or decoding with 503 and stops.
    """
    import uvicorn

    from dimple_rt import Runtime

    runtime = Runtime(model, backend=backend, device=device, dtype=dtype, quantize=quantize, preset=preset)
    scheduler = Scheduler(runtime, max_batch=max_batch, max_queue=max_queue, timeout=timeout)
    app = create_app(
        scheduler,
        model_name=str(model),
        api_key=api_key,
        image_dir=image_dir,
        limits=ImageLimits(max_images=max_images),
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_grace + 10,  # a backstop: the scheduler has answered everyone by then
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list | None = None) -> None:
            # uvicorn waits for in-flight requests, then cancels their tasks (a bare 500). Before that, stop the
            # scheduler: what is still decoding after the grace period gets a proper 503 and its connection ends.
            drain = asyncio.get_running_loop().call_later(shutdown_grace, scheduler.shutdown, 0.0)
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    server = Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again to the handler it found, which
    # would kill the process after a clean shutdown. A handler that ignores it makes the exit status 0.
    quiet = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)} if quiet else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _ignore(sig: int, frame: object) -> None:
    """The signal handler uvicorn hands a shutdown signal back to once it has shut down."""


__all__ = ["APIError", "ImageLimits", "Metrics", "Scheduler", "create_app", "serve"]
