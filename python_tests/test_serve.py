# SPDX-License-Identifier: Apache-2.0
"""The OpenAI-compatible server, driven by the real ``openai`` client (and httpx for what that client cannot send)
against dimple-tiny served by uvicorn on 127.0.0.1 at a free port, in a thread of this process.

Every answer is compared with ``Runtime.generate`` on the same conversation and options: per-sequence decisions
make a request's answer independent of what else the scheduler is decoding.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import PIL.Image
import pytest
import uvicorn

from dimple_rt import Runtime
from dimple_rt.presets import PRESETS
from dimple_rt.serve import Scheduler, create_app
from dimple_rt.serve.errors import APIError
from dimple_rt.serve.schemas import parse_chat_request
from dimple_rt.tiny import tasks

MODEL = "dimple-tiny"
KEY = "test-key"
MAX_TOKENS = 16
MAX_BATCH = 4
MAX_QUEUE = 4


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Server:
    """dimple-tiny behind uvicorn in a thread; ``url`` is its base URL."""

    def __init__(self, runtime: Runtime, image_dir: Path) -> None:
        self.runtime = runtime
        self.scheduler = Scheduler(runtime, max_batch=MAX_BATCH, max_queue=MAX_QUEUE, timeout=60)
        app = create_app(self.scheduler, model_name=MODEL, api_key=KEY, image_dir=image_dir)
        self.sock = _free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start within 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self.scheduler.resume()
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(MODEL)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    _example(0).image().save(folder / "scene.png")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    _example(0).image().save(outside)
    (folder / "escape.png").symlink_to(outside)
    return folder


@pytest.fixture(scope="module")
def server(runtime: Runtime, image_dir: Path):
    running = Server(runtime, image_dir)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _example(index: int) -> tasks.Example:
    found = (e for e in tasks.examples("test", 10_000) if e.has_image)
    return next(e for i, e in enumerate(found) if i == index)


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (0 allowed) and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _messages(url: str, question: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def _conversation(example: tasks.Example) -> list[dict]:
    """What the server hands to Runtime for ``_messages`` of this example: the PNG decoded back."""
    image = PIL.Image.open(io.BytesIO(_png(example.image())))
    return tasks.conversation(example, image)


def _request(example: tasks.Example) -> list[dict]:
    return _messages(_data_url(_png(example.image())), example.question)


def _body(**fields: object) -> dict:
    example = _example(0)
    return {"model": MODEL, "messages": _request(example), "max_tokens": MAX_TOKENS, **fields}


def _post(server: Server, body: object, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def test_completion_with_image_equals_generate(client: openai.OpenAI, runtime: Runtime) -> None:
    example = _example(0)
    reply = client.chat.completions.create(model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS)
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "stop"
    prompt_len = runtime.prepare(_conversation(example)).input_ids.shape[1]
    assert reply.usage.prompt_tokens == prompt_len
    assert reply.usage.completion_tokens == len(expected.token_ids)
    extension = reply.model_extra["dimple"]
    assert extension["forward_passes"] == expected.num_forward_passes
    assert extension["canvas_tokens"] == MAX_TOKENS
    assert extension["seconds"] >= extension["decode_seconds"] > 0


def test_stream_with_image_sends_the_answer(client: openai.OpenAI, runtime: Runtime) -> None:
    example = _example(1)
    options = {"threshold": None}  # one token per step: the prefix grows over several steps
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_request(example),
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"dimple": options},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS, **options)
    assert text == expected.text
    assert finish == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stream_canvas_events_and_sse_framing(server: Server, runtime: Runtime) -> None:
    body = _body(stream=True, dimple={"threshold": None, "stream_canvas": True})
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    canvases = [c["dimple"] for c in chunks if "dimple" in c and "canvas" in c["dimple"]]
    passes = next(c["dimple"]["forward_passes"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert [c["step"] for c in canvases] == list(range(passes))
    assert "␣" in canvases[0]["canvas"] and "␣" not in canvases[-1]["canvas"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    expected = runtime.generate(_conversation(_example(0)), max_new_tokens=MAX_TOKENS, threshold=None)
    assert text == expected.text


@pytest.mark.parametrize(
    "example_index, options",
    [
        (3, {"pipeline": "fast_dllm", "cache": "block", "block_length": 4, "early_stop": True}),
        (4, {"preset": "fast", "block_length": 4}),
    ],
    ids=["fast_dllm options", "a preset"],
)
def test_dimple_options_reach_the_runtime(
    client: openai.OpenAI, runtime: Runtime, example_index: int, options: dict
) -> None:
    example = _example(example_index)
    reply = client.chat.completions.create(
        model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS, extra_body={"dimple": options}
    )
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS, **options)
    assert reply.choices[0].message.content == expected.text
    assert reply.model_extra["dimple"]["forward_passes"] == expected.num_forward_passes


def test_seed_reproducible(client: openai.OpenAI, runtime: Runtime) -> None:
    example = _example(2)
    answers = [
        client.chat.completions.create(
            model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS, temperature=1.0, seed=seed
        )
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7)
    assert answers[0] == answers[1] == expected.text


def test_stop_string_cuts_the_answer(client: openai.OpenAI, runtime: Runtime) -> None:
    example = _example(0)
    full = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS).text
    assert len(full) >= 2
    stop = full[1:]
    reply = client.chat.completions.create(model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS, stop=stop)
    assert reply.choices[0].message.content == full[:1]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full[:1]


def test_concurrent_requests_join_one_batch_and_equal_single_answers(
    server: Server, client: openai.OpenAI, runtime: Runtime
) -> None:
    """Held in the queue, then released together: all four decode in the same forwards, greedy and seeded
    ones alike; a fifth request meets a full queue (429 with Retry-After); and each answer equals its
    single-request answer."""
    examples = [_example(i) for i in range(MAX_QUEUE)]
    options = [{"temperature": 1.0, "seed": i} if i % 2 else {} for i in range(MAX_QUEUE)]

    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=_request(examples[i]), max_tokens=MAX_TOKENS, **options[i]
        )
        return reply.choices[0].message.content

    server.scheduler.pause()
    try:
        with ThreadPoolExecutor(MAX_QUEUE) as pool:
            futures = [pool.submit(ask, i) for i in range(MAX_QUEUE)]
            deadline = time.monotonic() + 30
            while server.scheduler.queue_depth < MAX_QUEUE:
                assert time.monotonic() < deadline, "the requests did not reach the queue"
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as full:
                ask(0)
            assert full.value.response.headers["retry-after"] == "1"
            assert full.value.body["code"] == "queue_full"
            server.scheduler.resume()
            answers = [f.result(timeout=60) for f in futures]
    finally:
        server.scheduler.resume()
    assert server.scheduler.metrics.peak_batch_size == MAX_BATCH
    assert server.scheduler.metrics.peak_forward_rows == MAX_BATCH  # different options, one batched forward
    for i, answer in enumerate(answers):
        expected = runtime.generate(_conversation(examples[i]), max_new_tokens=MAX_TOKENS, **options[i])
        assert answer == expected.text, f"request {i}"


def test_a_request_arriving_mid_decode_joins_the_running_forwards(
    server: Server, client: openai.OpenAI, runtime: Runtime
) -> None:
    """A request sent while another decodes (a 2000-step 'dream' stream) joins its forwards at a step boundary:
    every step of it after its first (the prefill of its prompt) adds a row to a forward that runs anyway. Its
    answer and forward passes equal the request alone."""
    metrics = server.scheduler.metrics
    cancelled = metrics.finished["cancelled"]
    body = _body(stream=True, dimple={"pipeline": "dream", "steps": 2000, "threshold": None})
    headers = {"Authorization": f"Bearer {KEY}"}
    example, options = _example(2), {"threshold": None}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # the long request is decoding
        forwards, rows = metrics.forward_counts()
        reply = client.chat.completions.create(
            model=MODEL, messages=_request(example), max_tokens=MAX_TOKENS, extra_body={"dimple": options}
        )
        forwards_after, rows_after = metrics.forward_counts()
        assert server.scheduler.batch_size == 1  # the long one is still decoding
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS, **options)
    passes = reply.model_extra["dimple"]["forward_passes"]
    assert reply.choices[0].message.content == expected.text and passes == expected.num_forward_passes
    assert passes > 2
    assert (rows_after - rows) - (forwards_after - forwards) == passes - 1  # its steps that shared a forward
    deadline = time.monotonic() + 20
    while metrics.finished["cancelled"] == cancelled:  # the dropped stream leaves
        assert time.monotonic() < deadline, "the dropped request was not cancelled"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "options",
    [{"dimple": {"threshold": None}}, {"temperature": 1.0, "seed": 3, "dimple": {"alg": "origin", "threshold": None}}],
    ids=["greedy", "sampled"],
)
def test_one_batch_of_mixed_prompts_equals_single_answers(server: Server, runtime: Runtime, options: dict) -> None:
    """Four requests, two with pictures and two text-only of different lengths, decode in the same forwards over
    many steps (padded, their prompt K/V in one pooled cache); each answer (and its forward passes) equals the
    request alone."""
    texts = ["Hello.", "What colour is a red square? Answer in a few words, please."]
    conversations = [_conversation(_example(i)) for i in (3, 4)] + [[{"role": "user", "content": t}] for t in texts]
    messages = [_request(_example(i)) for i in (3, 4)] + [[{"role": "user", "content": t}] for t in texts]
    rows_before = server.scheduler.metrics.peak_forward_rows
    server.scheduler.metrics.peak_forward_rows = 0
    server.scheduler.pause()
    try:
        with ThreadPoolExecutor(len(messages)) as pool:
            futures = [
                pool.submit(_post, server, {"model": MODEL, "messages": m, "max_tokens": MAX_TOKENS, **options})
                for m in messages
            ]
            deadline = time.monotonic() + 30
            while server.scheduler.queue_depth < len(messages):
                assert time.monotonic() < deadline, "the requests did not reach the queue"
                time.sleep(0.02)
            server.scheduler.resume()
            replies = [f.result(timeout=60).json() for f in futures]
    finally:
        server.scheduler.resume()
    assert server.scheduler.metrics.peak_forward_rows == len(messages)
    server.scheduler.metrics.peak_forward_rows = max(rows_before, len(messages))
    flat = {k: v for k, v in options.items() if k != "dimple"} | options["dimple"]
    for conversation, reply in zip(conversations, replies):
        expected = runtime.generate(conversation, max_new_tokens=MAX_TOKENS, **flat)
        assert reply["choices"][0]["message"]["content"] == expected.text
        assert reply["dimple"]["forward_passes"] == expected.num_forward_passes


def test_local_image_path_inside_image_dir(client: openai.OpenAI, runtime: Runtime) -> None:
    example = _example(0)
    reply = client.chat.completions.create(
        model=MODEL, messages=_messages("scene.png", example.question), max_tokens=MAX_TOKENS
    )
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected.text


def _image_body(url: str, count: int = 1) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}] * count + [{"type": "text", "text": "What is it?"}]
    return _body(messages=[{"role": "user", "content": parts}])


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "dimple-tiny", "messages": [', 400, None, "not valid JSON"),
    "deeply nested JSON": (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
    "text part without text": (
        _body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        400,
        "messages[0].content[0]",
        "a text part is",
    ),
    "too much text": (_body(messages=[{"role": "user", "content": "x" * 1_000_001}]), 400, "messages", "characters"),
    "stop of the wrong type": (_body(stop=[""]), 400, "stop", "stop must be"),
    "max_tokens a bool": (_body(max_tokens=True), 400, "max_tokens", "max_tokens must be"),
    "seed a float": (_body(seed=1.5), 400, "seed", "seed"),
    "not an object": (b"[1, 2]", 400, None, "JSON object"),
    "unknown field": (_body(best_of=2), 400, "best_of", "unsupported field"),
    "a penalty": (_body(frequency_penalty=0.5), 400, "frequency_penalty", "frequency_penalty=0.5 is not supported"),
    "logprobs": (_body(logprobs=True), 400, "logprobs", "logprobs=true is not supported"),
    "JSON output": (_body(response_format={"type": "json_object"}), 400, "response_format", "is not supported"),
    "a required tool": (_body(tool_choice="required"), 400, "tool_choice", '"none" or "auto"'),
    "tools": (_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "no tools"),
    "a bool penalty": (_body(presence_penalty=False), 400, "presence_penalty", "is not supported"),
    "huge max_tokens": (_body(max_tokens=10**12), 400, "max_tokens", "max_tokens must be"),
    "canvas past the model's positions": (_body(max_tokens=5000), 400, "max_tokens", "max_position_embeddings"),
    "empty messages": (_body(messages=[]), 400, "messages", "non-empty list"),
    "bad role": (_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", "one of"),
    "n=2": (_body(n=2), 400, "n", "n must be 1"),
    "temperature out of range": (_body(temperature=-1), 400, "temperature", "temperature"),
    "unknown dimple option": (_body(dimple={"speed": 3}), 400, "dimple.speed", "unknown Dimple option"),
    "bad alg": (_body(dimple={"alg": "magic"}), 400, "dimple.alg", "alg must be one of"),
    "bad threshold": (_body(dimple={"threshold": 2}), 400, "dimple.threshold", "threshold"),
    "bad template": (_body(dimple={"template": "<mask:x>"}), 400, None, "mask"),
    "bad preset": (_body(dimple={"preset": "turbo"}), 400, "dimple.preset", "preset must be one of"),
    "block option without its pipeline": (
        _body(dimple={"block_start": "threshold"}),
        400,
        "dimple.block_start",
        "needs pipeline='fast_dllm'",
    ),
    "broken base64": (_image_body("data:image/png;base64,iVBORw0KG!!!"), 400, None, "base64"),
    "not an image": (_image_body(_data_url(b"hello, world")), 400, None, "not a readable image"),
    "0x0 image": (_image_body(_data_url(_png_header_only(0, 0))), 400, None, "image"),
    "100000x1 image": (
        _image_body(_data_url(_png(PIL.Image.new("RGB", (100000, 1))))),
        400,
        None,
        "at least 28 pixels",
    ),
    "too many images": (_image_body(_data_url(_png(_example(0).image())), 5), 400, None, "too many images"),
    "remote URL": (_image_body("https://example.com/cat.png"), 400, None, "never fetches"),
    "path with ..": (_image_body("../outside/secret.png"), 400, None, "'..'"),
    "symlink out of the folder": (_image_body("escape.png"), 400, None, "outside the image folder"),
    "missing image file": (_image_body("nope.png"), 400, None, "no such image"),
    "another model": (_body(model="gpt-4"), 404, "model", "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(server: Server, case: str) -> None:
    body, status, param, words = BAD_REQUESTS[case]
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    if case.endswith("image") or "URL" in case or "base64" in case:
        assert error["param"].startswith("messages[0].content[")


def test_harmless_defaults_that_clients_send_are_accepted(client: openai.OpenAI, runtime: Runtime) -> None:
    """The real client with every OpenAI field set to a value that changes nothing here: the answer is the
    plain one."""
    example = _example(0)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=_request(example),
        max_completion_tokens=MAX_TOKENS,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        top_logprobs=0,
        logit_bias={},
        user="someone",
        response_format={"type": "text"},
        modalities=["text"],
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        store=False,
        metadata={"team": "tests"},
        service_tier="auto",
        safety_identifier="someone",
        prompt_cache_key="k",
    )
    expected = runtime.generate(_conversation(example), max_new_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_request(example),
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        tool_choice="auto",
        response_format={"type": "text"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_api_key_is_enforced(server: Server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert _post(server, _body(), Authorization="").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_unknown_route_gets_an_openai_error(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404
    assert "endpoints" in response.json()["error"]["message"]


def test_client_disconnect_cancels_its_request(server: Server) -> None:
    """A stream of a long request (the 'dream' pipeline runs every one of its 2000 steps) is dropped after its
    first chunk: the request leaves the batch long before its last step."""
    metrics = server.scheduler.metrics
    cancelled, passes = metrics.finished["cancelled"], metrics.forward_passes
    body = _body(stream=True, dimple={"pipeline": "dream", "steps": 2000, "threshold": None})
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while metrics.finished["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the dropped request was not cancelled"
        time.sleep(0.05)
    assert server.scheduler.batch_size == 0
    assert metrics.forward_passes - passes < 2000


def test_timeout_mid_stream_ends_the_stream_with_an_error(server: Server, client: openai.OpenAI) -> None:
    server.scheduler.timeout = 1.0
    try:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=_request(_example(0)),
            max_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"dimple": {"pipeline": "dream", "steps": 5000, "threshold": None}},
        )
        with pytest.raises(openai.APIError, match="timeout"):
            list(stream)
    finally:
        server.scheduler.timeout = 60
    assert httpx.get(f"{server.url}/health").json()["batch_size"] == 0


def test_client_disconnect_while_queued_cancels_its_request(server: Server) -> None:
    """A non-streamed request waiting in the (paused) queue whose client gives up leaves the queue."""
    cancelled = server.scheduler.metrics.finished["cancelled"]
    server.scheduler.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/chat/completions",
                json=_body(),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=httpx.Timeout(30, read=1.0),
            )
        deadline = time.monotonic() + 10
        while server.scheduler.queue_depth or server.scheduler.metrics.finished["cancelled"] == cancelled:
            assert time.monotonic() < deadline, "the abandoned request stayed in the queue"
            time.sleep(0.05)
    finally:
        server.scheduler.resume()


METRIC_LINE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\"(,[a-zA-Z_]\w*=\"[^\"]*\")*\})? (\S+)$"
)


def test_metrics_parse(server: Server) -> None:
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        match = METRIC_LINE.match(line)
        assert match, line
        samples[match.group(1)] = samples.get(match.group(1), 0.0) + float(match.group(4))
    for name in ("dimple_requests_total", "dimple_queue_depth", "dimple_batch_size", "dimple_forward_passes_total"):
        assert name in samples
    assert samples["dimple_forward_passes_total"] > 0
    assert samples["dimple_tokens_per_second"] >= 0
    assert samples["dimple_http_responses_total"] > 0


def test_still_healthy_after_everything(server: Server, client: openai.OpenAI) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "model": MODEL, "queue_depth": 0, "batch_size": 0}
    reply = client.chat.completions.create(model=MODEL, messages=_request(_example(0)), max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content


def test_request_options_are_checked_over_the_servers_preset() -> None:
    """A server started with preset="fast" takes block options alone (its preset supplies the pipeline); without
    a preset the same request is a 400 naming the option."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "dimple": {"block_length": 4}}
    request = parse_chat_request(body, model_name=MODEL, preset=PRESETS["fast"])
    assert request.options == {"block_length": 4}
    with pytest.raises(APIError) as error:
        parse_chat_request(body, model_name=MODEL)
    assert error.value.param == "dimple.block_length"
