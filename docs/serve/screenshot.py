"""A screenshot of the chat page (`python -m gptexp serve`) in headless Chromium (Debian's `chromium`, driven by
Playwright): two requests to the stories260k_instruct run, each answer streamed in, with its tokens/s.

    python train.py experiment=stories260k_instruct hydra.run.dir=outputs/stories260k_instruct
    python docs/serve/screenshot.py outputs/stories260k_instruct

Writes docs/serve/chat.png.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
MESSAGES = ["Write a story that uses the words: dog, ball, happy.", "Write a story that uses the words: sun, hat, run."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the run (or any source=) to chat with")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as temporary:
        server = subprocess.Popen([sys.executable, "-m", "gptexp", "serve", f"source={args.source}", f"port={port}",
                                   "name=stories260k_instruct", f"hydra.run.dir={temporary}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "health", timeout=2).close()
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit("error: the server ended before it answered")
                    time.sleep(0.2)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 820})
                page.goto(url)
                page.fill("#temperature", "0.7")
                page.fill("#max-tokens", "400")
                for n, message in enumerate(MESSAGES, 1):
                    page.fill("#input", message)
                    page.keyboard.press("Enter")
                    page.wait_for_function(f"[...document.querySelectorAll('.meta')].filter(m => /tokens\\/s/.test("
                                           f"m.textContent)).length == {n}", timeout=60000)
                page.screenshot(path=str(HERE / "chat.png"))
                browser.close()
        finally:
            server.terminate()
            server.wait(30)
    print(f"wrote {HERE / 'chat.png'}")


if __name__ == "__main__":
    main()
