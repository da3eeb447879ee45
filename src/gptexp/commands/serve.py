"""Serve a model: python -m gptexp serve source=<...> [port=8000] [host=127.0.0.1] [api_key=...] [quantize=...]

OpenAI's API at /v1 (chat/completions, completions, models), vLLM's /tokenize, /detokenize and /tokenizer_info (so
lm-evaluation-harness's local-completions scores through it), /health, and a chat page at /. Requests that arrive
together decode together (gptexp.inference.batching). The address is taken and the source loaded before anything
listens: a port in use or a bad source is one line and exit status 2.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError
from gptexp.weights import load_source

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
KEY_VARIABLE = "GPTEXP_API_KEY"


def bind(host: str, port: int) -> socket.socket:
    """The address, taken (not yet listening): a port in use is refused now, before the model loads."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r}: choose a port number from 1 to 65535 (0: any free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ConfigError(f"host={host}: not an address of this machine ({error.strerror}); use 127.0.0.1 or "
                          f"0.0.0.0") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = "is in use" if error.errno == 98 else f"cannot be taken ({error.strerror})"
        raise ConfigError(f"port={port} on {host} {reason}: pass port=<another> (or stop what holds it)") from None
    return sock


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from gptexp.inference.batching import Batcher
    from gptexp.serving import Served, build_app

    if not isinstance(cfg.max_batch, int) or cfg.max_batch < 1:
        raise ConfigError(f"max_batch must be an integer >= 1, got {cfg.max_batch!r}")
    sock = bind(str(cfg.host), cfg.port)
    try:
        source = load_source(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
        device = source.place(cfg.device, cfg.precision, cfg.quantize, cfg.quantize_group_size)
    except BaseException:
        sock.close()
        raise
    path = Path(str(cfg.source)).expanduser()
    name = str(cfg.name) if cfg.name is not None else (path.stem if path.is_file() else path.name) or str(cfg.source)
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(KEY_VARIABLE) or None
    host, port = sock.getsockname()[:2]
    if str(cfg.host) not in LOCAL_HOSTS:
        log.warning("listening on %s: any machine that reaches this one can use the model%s", cfg.host,
                    "" if api_key else " (set api_key=... or GPTEXP_API_KEY to require a key)")
    batcher = Batcher(source.model, cfg.max_batch).start()
    served = Served(name, source, batcher, str(api_key) if api_key else None)
    log.info("%s: %s, %.2fM parameters on %s; %d rows a step", name, source.description,
             source.model.num_parameters() / 1e6, device, cfg.max_batch)
    address = f"[{host}]" if ":" in host else host
    print(f"serving {name} at http://{address}:{port}/ (chat page), OpenAI API at http://{address}:{port}/v1"
          f"{' (api_key required)' if api_key else ''}; Ctrl-C stops", flush=True)
    config = uvicorn.Config(build_app(served), log_level="warning", timeout_graceful_shutdown=1)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stopped serving first, then passed Ctrl-C on: the usual way to stop a server
        pass
    finally:
        batcher.close()
        sock.close()
    stats = batcher.stats
    print(f"stopped: {stats.requests} requests answered, {stats.tokens} tokens decoded in {stats.steps} steps",
          flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    with answered_errors(cfg.output_dir):
        serve(cfg)


if __name__ == "__main__":
    run_command(main)
