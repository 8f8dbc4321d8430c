"""`mlxtune serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from mlxtune.errors import MlxtuneError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MlxtuneError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another "
                           "server running? pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_folder_model(run: Path) -> tuple[str, str]:
    """(run name, base model name) recorded in run folder `run`."""
    from mlxtune.models.adapters import base_model, read_adapter_config

    return Path(run).resolve().name, base_model(run, read_adapter_config(run))


def build_registry(model: str | None = None, adapters: list[str] = (), run: Path | None = None,
                   fuse: bool = False, max_loras: int = 4, max_lora_rank: int = 64,
                   say=print, max_cpu_loras: int | None = None):
    """Load the base model once and every adapter given as NAME=DIR (and the run's, if any)."""
    from mlxtune.serve.registry import AdapterRegistry

    pairs = []
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MlxtuneError(f"--adapter {item!r}: write it as NAME=DIR")
        pairs.append((name, Path(path)))
    served, fuse_path = None, None
    if run is not None:
        run_name, run_model = run_folder_model(Path(run))
        model = model or run_model
        if fuse:
            served, fuse_path = run_name, Path(run)
        else:
            pairs.insert(0, (run_name, Path(run)))
    elif fuse:
        raise MlxtuneError("--fuse needs --run: it fuses that run's adapter into the base")
    if model is None:
        raise MlxtuneError("no model to serve: pass --model NAME or --run runs/NAME")
    if len(pairs) > max_loras:
        say(f"note: {len(pairs)} adapters, --max-loras {max_loras}: the least recently used "
            "ones wait in host memory or on disk and come back on their next request")
    registry = AdapterRegistry(model, max_loras=max_loras, max_lora_rank=max_lora_rank,
                               max_cpu_loras=max_cpu_loras, served_name=served,
                               fuse_adapter=fuse_path)
    for name, path in pairs:
        registry.add(name, path)
    return registry


def serve(model: str | None = None, adapters: list[str] = (), run: Path | None = None,
          fuse: bool = False, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_loras: int = 4, max_lora_rank: int = 64,
          max_batch: int = 8, max_queue: int = 64, ui: bool = True, say=print,
          max_cpu_loras: int | None = None, request_timeout: float = 600.0) -> None:
    """Serve until interrupted: check the port first, then load, then listen; the playground
    page at / unless `ui` is False."""
    import uvicorn

    from mlxtune.serve.app import create_app

    sock = bind_socket(host, port)  # before loading anything: a taken port fails in a second
    registry = build_registry(model, adapters, run, fuse, max_loras, max_lora_rank, say,
                              max_cpu_loras)
    app = create_app(registry, api_key=api_key, max_batch=max_batch, max_queue=max_queue, ui=ui,
                     request_timeout=request_timeout)
    where = {"url": f"http://{host}:{port}/v1"}
    if ui:
        where["playground"] = f"http://{host}:{port}/"
    say(json.dumps({"serving": registry.names(), **where}))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
