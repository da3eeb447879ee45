"""python -m gptexp serve: a real server on a free port, talked to by the official `openai` client, by
lm-evaluation-harness's local-completions model, by plain HTTP (bad requests, a client that leaves) and by a real
headless Chromium on its chat page. Its answers are checked against what `sample` and `evaluate` give."""

import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from gptexp.core.config import asset_path
from gptexp.data.tokenizers import continuation_text, prompt_ids
from gptexp.inference.generation import decode
from gptexp.weights import load_source
from servers import free_port, get, wait_for_json
from training import execute, start

openai = pytest.importorskip("openai")
STORIES = asset_path("stories260K/stories260K.bin")
NAME = "stories260K"


class Server:
    """`python -m gptexp serve` started on a free port, stopped (Ctrl-C) at the end."""

    def __init__(self, directory: Path, *overrides: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start("-m", "gptexp", "serve", f"source={STORIES}", f"port={self.port}",
                             f"hydra.run.dir={directory}", *overrides, env=env)
        self.health = wait_for_json(f"{self.url}/health", self.process)

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGINT)
        stdout, stderr = self.process.communicate(timeout=30)
        return self.process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve"))
    yield server
    status, stdout, stderr = server.stop()
    assert status == 0, stderr[-2000:]
    assert f"serving {NAME} at http://127.0.0.1:{server.port}/" in stdout


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stories():
    source = load_source(STORIES)
    source.model.eval()
    return source


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def greedy(stories, prompt: list[int], tokens: int) -> str:
    new = [int(c[0, 0]) for c in decode(stories.model, torch.tensor([prompt]), tokens, temperature=0.0)]
    return continuation_text(stories.tokenizer, prompt, new)


def test_the_openai_client_lists_chats_and_streams(server, client, tmp_path):
    [model] = client.models.list().data
    assert model.id == NAME and model.model_extra["context_length"] == 512
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."}]
    chat = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=48)
    answer = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 48
    # `sample mode=chat` says the same to the same turn
    result = execute("-m", "gptexp", "sample", f"source={STORIES}", "mode=chat", "system='Be kind.'",
                     "max_new_tokens=48", "temperature=0", f"hydra.run.dir={tmp_path}", input="Tell me a story.\n")
    assert result.returncode == 0, result.stderr[-2000:]
    [record] = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert answer == record["completion"].lstrip() and answer
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=48,
                                                stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == answer  # the stream is the unstreamed greedy text
    assert reasons[-1] == chat.choices[0].finish_reason and not any(reasons[:-1])
    assert usage.completion_tokens == chat.usage.completion_tokens and usage.prompt_tokens == chat.usage.prompt_tokens
    scored = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8, logprobs=True,
                                            top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert "".join(t.token for t in tokens).lstrip() == scored.choices[0].message.content == answer[:len(
        scored.choices[0].message.content)]
    assert len(tokens) == 8 and all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in tokens)


def test_a_completion_echoes_the_prompt_with_the_models_logprobs(client, stories):
    prompt = "Once upon a time, there was"
    result = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    [choice] = result.choices
    ids = prompt_ids(stories.tokenizer, prompt)
    assert choice.text == prompt + greedy(stories, ids, 6)
    scored = choice.logprobs
    assert "".join(scored.tokens) == choice.text and len(scored.tokens) == len(ids) + 6
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    with torch.no_grad():
        logits, _ = stories.model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(scored.token_logprobs[1:len(ids)]), expected, atol=1e-5)
    for logprob, top in zip(scored.token_logprobs[len(ids):], scored.top_logprobs[len(ids):]):
        assert len(top) == 2 and logprob == pytest.approx(max(top.values()))  # greedy: the likeliest token
    scored_only = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored_only.choices[0].text == prompt and scored_only.choices[0].finish_reason == "length"
    assert scored_only.choices[0].logprobs.token_logprobs == scored.token_logprobs[:len(ids)]


def test_n_choices_with_a_seed_are_samples_of_that_seed(client, tmp_path):
    """Choice i of seed s is what `sample seed=s+i` writes with the same sampling."""
    ask = dict(model=NAME, prompt="One day, a little dog", max_tokens=30, temperature=0.9, n=2, seed=11,
               extra_body={"top_k": 40})
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and texts[0] != texts[1]
    for i, text in enumerate(texts):
        out = tmp_path / str(i)
        result = execute("-m", "gptexp", "sample", f"source={STORIES}", "prompt='One day, a little dog'",
                         "max_new_tokens=30", "temperature=0.9", "top_k=40", f"seed={11 + i}", f"hydra.run.dir={out}")
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((out / "samples.jsonl").read_text())["completion"] == text


def test_requests_that_arrive_together_decode_together_as_each_would_alone(server, stories):
    prompts = ["Once upon a time", "The cat", "Lily and Tom went to the park. They saw", "A big red ball",
               "Sue said, \"", "The sun"]
    before = get(f"{server.url}/health")["steps"]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = post(f"{server.url}/v1/completions", {"prompt": prompts[i], "max_tokens": 80, "temperature": 0,
                                                           "ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for prompt, (status, body) in zip(prompts, answers):
        expected = greedy(stories, prompt_ids(stories.tokenizer, prompt), 80)
        assert status == 200 and body["choices"][0]["text"] == expected
    health = get(f"{server.url}/health")
    assert health["largest_batch"] > 1  # decoded together
    assert health["steps"] - before < len(prompts) * 80  # fewer steps than one request after another


BAD = [
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', 400, "not valid JSON", None),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "The model `gpt-4` does not exist", "model_not_found"),
    ("completions", {"prompt": "word " * 600}, 400, "maximum context length is 512 tokens", "context_length_exceeded"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 0",
     None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "roles must alternate", None),
    ("chat/completions", {"messages": []}, 400, "messages: List should have at least 1 item", None),
    ("completions", {"prompt": "hi", "n": 9}, 400, "n must be between 1 and 8", None),
    ("completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported",
     "unsupported_parameter"),
    ("completions", {"prompt": [1, 99999]}, 400, "token ids must be", None),
    ("completions", {"prompt": "hi", "temperature": 3}, 400, "temperature: Input should be less than or equal to 2",
     None),
]


@pytest.mark.parametrize("endpoint, body, status, message, code", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_requests_get_openais_error_object_and_the_server_goes_on(server, endpoint, body, status, message, code):
    answer_status, answer = post(f"{server.url}/v1/{endpoint}", body)
    assert answer_status == status and message in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == code
    ok, fine = post(f"{server.url}/v1/completions", {"prompt": "The dog", "max_tokens": 3})
    assert ok == 200 and fine["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    before = get(f"{server.url}/health")
    body = json.dumps({"prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True, "temperature": 1})
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while received.count(b"data: {") < 3:  # three chunks of text, then the client goes away
            received += connection.recv(4096)
    deadline = time.time() + 10
    while (health := get(f"{server.url}/health"))["active_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert health["active_rows"] == 0 and health["stopped_rows"] == before["stopped_rows"] + 1
    assert health["tokens"] - before["tokens"] < 500  # it stopped before its 500 tokens
    started = time.perf_counter()
    status, answer = post(f"{server.url}/v1/completions", {"prompt": "The dog", "max_tokens": 20, "temperature": 0})
    assert status == 200 and time.perf_counter() - started < 5  # served at once


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no Chromium here (Debian: apt-get install chromium); the chat page is tested in a browser")
def test_chromium_chats_on_the_page(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)
        assert NAME in page.title()
        page.fill("#input", "Tell me a story about a dog.")
        page.keyboard.press("Enter")
        answered = ("n => [...document.querySelectorAll('.meta')].filter(m => /tokens\\/s/.test(m.textContent))"
                    ".length == n")
        page.wait_for_function(answered, arg=1, timeout=30000)
        answer = page.text_content(".message.assistant")
        assert answer and "error" not in answer
        assert page.text_content(".message.user") == "Tell me a story about a dog."
        page.fill("#input", "And then?")  # the conversation goes on: two answers on the page
        page.keyboard.press("Enter")
        page.wait_for_function(answered, arg=2, timeout=30000)
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10000


def test_a_key_guards_the_api_and_another_host_is_warned_of(tmp_path):
    server = Server(tmp_path / "run", "host=0.0.0.0", env=os.environ | {"GPTEXP_API_KEY": "s3cret"})
    try:
        assert get(f"{server.url}/health")["api_key_required"]
        status, answer = post(f"{server.url}/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        status, _ = post(f"{server.url}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                         {"Authorization": "Bearer s3cret"})
        assert status == 200
        guarded = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert guarded.models.list().data[0].id == NAME
        with urllib.request.urlopen(server.url, timeout=10) as page:  # the page is open; its requests send the key
            assert b"API key" in page.read()
    finally:
        status, _, stderr = server.stop()
    assert status == 0
    assert "listening on 0.0.0.0: any machine that reaches this one can use the model" in stderr


@pytest.mark.parametrize("case", ["port in use", "bad source", "bad port"])
def test_a_busy_port_or_a_bad_source_is_one_line_before_anything_listens(case, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    arguments = {"port in use": [f"source={STORIES}", f"port={port}"],
                 "bad source": [f"source={tmp_path / 'missing.ckpt'}", f"port={free_port()}"],
                 "bad port": [f"source={STORIES}", "port=70000"]}[case]
    try:
        result = execute("-m", "gptexp", "serve", *arguments, f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    finally:
        holder.close()
    expected = {"port in use": f"error: port={port} on 127.0.0.1 is in use: pass port=<another>",
                "bad source": "error: source=", "bad port": "error: port=70000: choose a port number"}[case]
    assert result.returncode == 2 and result.stderr.strip().startswith(expected), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_lm_evals_local_completions_scores_through_the_server_as_evaluate_does(server, stories, tmp_path):
    """The harness's OpenAI-completions client, reading the server's tokenizer (vLLM's /tokenize routes), scores a
    multiple-choice task as `evaluate task=lm_eval` scores the same weights (without a start token: the harness's
    remote tokenizer adds none)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_lm_eval import MC, assert_same, metrics, responses, task_yaml

    from gptexp.eval.lm_eval_adapter import GptexpLM

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MC))
    (tasks / "toy_mc.yaml").write_text(task_yaml("toy_mc", tasks / "mc.jsonl", (
        'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')))
    manager = TaskManager(include_path=str(tasks))
    settings = {"tasks": ["toy_mc"], "task_manager": manager, "bootstrap_iters": 0, "log_samples": True}
    served = lm_eval.simple_evaluate(model="local-completions", model_args={
        "base_url": f"{server.url}/v1/completions", "model": NAME, "tokenizer_backend": "remote",
        "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1}, **settings)
    local = lm_eval.simple_evaluate(model=GptexpLM(stories, add_bos_token=False), **settings)
    assert_same(responses(served), responses(local), "resps")  # every log-likelihood within 1e-5
    result = execute("-m", "gptexp", "evaluate", f"source={STORIES}", "task=lm_eval", "tasks=[toy_mc]",
                     f"include_path={tasks}", "add_bos_token=false", "logger=none", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same(json.loads((tmp_path / "e" / "results.json").read_text())["tasks"], metrics(served), "results.json")


def test_stop_strings_end_the_answer_before_them_streamed_or_not(client):
    ask = dict(model=NAME, prompt="Once upon a time", max_tokens=60, temperature=0, stop=[" girl", "\n\n"])
    whole = client.completions.create(**ask).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True) if c.choices)
    assert whole.finish_reason == "stop" and whole.text == ", there was a little" == streamed  # " girl" never sent


def test_a_chat_starts_with_the_runs_saved_system_prompt_unless_the_messages_give_one(stories):
    """An instruction run saves its template and system prompt (data.system); the server writes chats as it trained."""
    from gptexp.data import templates
    from gptexp.serving.app import Served, conversation
    from gptexp.serving.protocol import Message
    from gptexp.weights import Source

    run = Source(stories.model, stories.tokenizer, "an instruction run", template="llama2_chat", system="Be kind.")
    served = Served("run", run, batcher=None)
    template = templates.get("llama2_chat")
    user = [Message(role="user", content="Tell me a story.")]
    assert conversation(served, user) == templates.prompt_ids(template, stories.tokenizer, [], "Tell me a story.",
                                                              "Be kind.")
    own = [Message(role="system", content=[{"type": "text", "text": "Be brief."}]), *user]
    assert conversation(served, own) == templates.prompt_ids(template, stories.tokenizer, [], "Tell me a story.",
                                                             "Be brief.")
