"""Do requests that arrive together decode together? `python -m gptexp serve` is started on a source and 1, 4 and 8
clients stream completions from it at once (each its own prompt, greedy, a fixed number of new tokens: end tokens
ignored); the aggregate tokens/s of each round is printed beside one client's, and every text is checked against
the tokens `sample` decodes for that prompt alone (gptexp.inference.generation.decode, greedy).

    python benchmarks/serve_concurrency.py [SOURCE] [--tokens 200] [--clients 1 4 8] [--rounds 3]

SOURCE: anything `source=` reads (default: the bundled stories260K); `gpt2-random` builds a GPT-2 124M with random
weights in a temporary directory (decoding speed does not depend on the weights). The floor: 8 clients together get
at least 3x the tokens/s of one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gptexp.core.config import asset_path  # noqa: E402
from gptexp.data.tokenizers import continuation_text, prompt_ids  # noqa: E402
from gptexp.inference.generation import decode  # noqa: E402
from gptexp.weights import load_source  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily and Tom went to the park. They", "One day, a bird",
           "Sue had a red ball.", "The sun was hot, so", "Tim wanted to build a", "Mom said, \""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(url: str, name: str, prompt: str, tokens: int) -> tuple[str, int]:
    """One streamed greedy completion: its text and the chunks that carried text."""
    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    text, chunks = [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["text"]
                text.append(piece)
                chunks += bool(piece)
    return "".join(text), chunks


def round_of(url: str, name: str, clients: int, tokens: int) -> tuple[float, list[str]]:
    """`clients` streams started together: the aggregate new tokens/s, and each client's text."""
    texts = [""] * clients
    def client(i: int) -> None:
        texts[i] = stream(url, name, PROMPTS[i % len(PROMPTS)], tokens)[0]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * tokens / (time.perf_counter() - start), texts


def random_gpt2(directory: Path) -> Path:
    from gptexp.models.gpt2 import GPT2, GPT2Config
    from gptexp.weights import save_hf

    torch.manual_seed(0)
    save_hf(GPT2(GPT2Config()), directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=str(asset_path("stories260K/stories260K.bin")))
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each client count; the median is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        source = random_gpt2(Path(temporary) / "gpt2") if args.source == "gpt2-random" else Path(args.source)
        loaded = load_source(source)
        model, tokenizer = loaded.model.eval(), loaded.tokenizer
        expected = {}
        for prompt in PROMPTS:
            ids = prompt_ids(tokenizer, prompt)
            new = [int(c[0, 0]) for c in decode(model, torch.tensor([ids]), args.tokens, temperature=0.0)]
            expected[prompt] = continuation_text(tokenizer, ids, new)
        port = free_port()
        name = "bench"
        server = subprocess.Popen([sys.executable, "-m", "gptexp", "serve", f"source={source}", f"port={port}",
                                   f"name={name}", f"max_batch={max(args.clients)}",
                                   f"hydra.run.dir={Path(temporary) / 'serve'}"], cwd=ROOT,
                                  env=os.environ | {"PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None, "the server ended before it answered"
                    time.sleep(0.2)
            round_of(url, name, 1, 8)  # warm up
            cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), "unknown CPU")
            print(f"{loaded.description}; {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                  f"{args.tokens} new tokens a client, greedy, streamed; median of {args.rounds} rounds")
            print(f"{'clients':>8} {'tokens/s':>10} {'vs 1':>6}  text = sample's")
            single = None
            for clients in args.clients:
                rates, same = [], True
                for _ in range(args.rounds):
                    rate, texts = round_of(url, name, clients, args.tokens)
                    rates.append(rate)
                    same &= all(texts[i] == expected[PROMPTS[i % len(PROMPTS)]] for i in range(clients))
                rate = statistics.median(rates)
                single = single or rate
                print(f"{clients:>8} {rate:>10.1f} {rate / single:>5.2f}x  {'yes' if same else 'NO'}", flush=True)
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
