"""`refrag serve`: the real server on a free localhost port, driven by the real `openai` client, LangChain and raw
HTTP (tiny random models: the answers' content does not matter, their shape and the server's behaviour do)."""

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
from conftest import tiny_refrag

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from refrag import generation
from refrag.config import DEFAULT_POLICY
from refrag.serve.app import ServeOptions
from refrag.serve.engine import Engine, EngineOptions, Job, QueueFull
from refrag.serve.local import free_port, local_server

PASSAGES = ["Paris is the capital of France. The quick brown fox jumps over the lazy dog.",
            "Rivers flow to the sea; mountains rise above the clouds."]
CONTEXT = {"passages": PASSAGES, "mode": "refrag"}


@pytest.fixture(scope="module")
def model():
    return tiny_refrag("llama", k=4)


@pytest.fixture(scope="module")
def url(model):
    with local_server(Engine(model, None, EngineOptions(max_batch=4))) as base:
        yield base


def client(base: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_chat_completion_with_the_openai_client(url):
    r = client(url).chat.completions.create(model="refrag", messages=[{"role": "user", "content": "Where is Paris?"}],
                                            max_tokens=8, extra_body=CONTEXT)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    extra = r.model_extra["refrag"]
    assert extra["positions_saved"] > 0 and extra["timings"]["ttft_s"] > 0 and extra["policy"] == DEFAULT_POLICY
    full = client(url).chat.completions.create(model="refrag", messages=[{"role": "user", "content": "Where?"}],
                                               max_tokens=4, extra_body={"passages": PASSAGES, "mode": "full"})
    assert full.model_extra["refrag"]["positions_saved"] == 0
    assert full.usage.prompt_tokens > r.usage.prompt_tokens


def test_streaming_ends_with_done_and_matches_the_text(url):
    stream = client(url).chat.completions.create(
        model="refrag", messages=[{"role": "user", "content": "Where is Paris?"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body=CONTEXT)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12
    plain = client(url).chat.completions.create(model="refrag", messages=[{"role": "user", "content": "Where is Paris?"}],
                                                max_tokens=12, extra_body=CONTEXT)
    assert text.strip() == plain.choices[0].message.content  # greedy: the same answer either way
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "refrag", "prompt": "Where?", "stream": True,
                                                              "max_tokens": 5, **CONTEXT}) as raw:
        lines = [x for x in raw.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_async_client_and_concurrent_requests_are_batched(url, model):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        calls = [c.chat.completions.create(model="refrag", messages=[{"role": "user", "content": f"q {i}?"}],
                                           max_tokens=6, extra_body=CONTEXT) for i in range(8)]
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert len(answers) == 8 and all(a.choices[0].message.content is not None for a in answers)


def test_text_completions_and_models_and_health(url):
    r = client(url).completions.create(model="refrag", prompt="Where is Paris?", max_tokens=5, extra_body=CONTEXT)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert [m.id for m in client(url).models.list()] == ["refrag"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200


def test_langchain_chat_openai(url):
    chat_openai = pytest.importorskip("langchain_openai")
    llm = chat_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="none", model="refrag", max_tokens=6,
                                 extra_body=CONTEXT, max_retries=0)
    assert isinstance(llm.invoke("Where is Paris?").content, str)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "JSON"),
    (json.dumps({"model": "refrag", "messages": [{"role": "user", "content": "q"}], "max_tokens": "many"}), 400,
     "max_tokens"),
    (json.dumps({"model": "refrag", "messages": []}), 400, "messages"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "q"}], **CONTEXT}), 404, "gpt-4"),
    (json.dumps({"model": "refrag", "messages": [{"role": "user", "content": "   "}], **CONTEXT}), 400, "question"),
    (json.dumps({"model": "refrag", "messages": [{"role": "user", "content": "q"}]}), 400, "no index"),
    (json.dumps({"model": "refrag", "messages": [{"role": "user", "content": "q"}], "mode": "full",
                 "passages": ["fox dog sea " * 400]}), 400, "window"),
    (b"{" + b" " * (10 << 20) + b"}", 413, "exceeds"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, body, status, fragment):
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    assert fragment.lower() in error_of(r)["message"].lower()
    ok = client(url).chat.completions.create(model="refrag", messages=[{"role": "user", "content": "q?"}],
                                             max_tokens=2, extra_body=CONTEXT)
    assert ok.choices[0].message.content is not None


def test_api_key_on_every_route_but_health(model):
    with local_server(Engine(model), ServeOptions(api_key="s3cret")) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        for path in ("/ready", "/v1/models"):
            assert httpx.get(f"{base}{path}").status_code == 401
            assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert [m.id for m in client(base, "s3cret").models.list()] == ["refrag"]


def test_a_client_that_disconnects_mid_stream_stops_its_generation(model, monkeypatch):
    monkeypatch.setattr(generation, "_eos_ids", lambda model: set())  # only a cancel can end it early
    engine = Engine(model)
    with local_server(engine) as base:
        body = {"model": "refrag", "messages": [{"role": "user", "content": "q?"}], "stream": True,
                "max_tokens": 400, **CONTEXT}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body) as raw:
            for line in raw.iter_lines():  # the first generated text arrived: the decoder runs; now leave
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
        for _ in range(100):
            if engine.finish_reasons["cancelled"]:
                break
            time.sleep(0.05)
    assert engine.finish_reasons == {"cancelled": 1}


def test_a_full_queue_answers_429_with_retry_after(model, monkeypatch):
    gate = threading.Event()
    real = generation.generate

    def slow_generate(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr("refrag.serve.engine.generate", slow_generate)
    engine = Engine(model, None, EngineOptions(max_batch=1, max_queue=1, batch_wait_s=0.0))
    with local_server(engine) as base:
        body = {"model": "refrag", "messages": [{"role": "user", "content": "q?"}], "max_tokens": 2, **CONTEXT}

        async def flood():
            async with httpx.AsyncClient(timeout=30) as c:
                first = asyncio.ensure_future(c.post(f"{base}/v1/chat/completions", json=body))
                await asyncio.sleep(0.5)  # the worker holds it (blocked in generate)
                second = asyncio.ensure_future(c.post(f"{base}/v1/chat/completions", json=body))
                await asyncio.sleep(0.3)  # waits in the queue (size 1)
                third = await c.post(f"{base}/v1/chat/completions", json=body)
                gate.set()
                return third, await first, await second

        third, first, second = asyncio.run(flood())
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert error_of(third)["type"] == "rate_limit_error"
    assert first.status_code == second.status_code == 200


def test_stop_finishes_the_running_batch_and_fails_the_queued_jobs(model):
    engine = Engine(model, None, EngineOptions(max_queue=2))
    loop = asyncio.new_event_loop()
    from refrag.config import CompressionOptions, SamplingOptions

    def job() -> Job:
        return Job("q?", tuple(PASSAGES), 1, CompressionOptions(), SamplingOptions(max_new_tokens=2), loop)

    engine.submit(job()), engine.submit(job())
    with pytest.raises(QueueFull):
        engine.submit(job())
    engine.stop()  # never started: both queued jobs are failed, nothing hangs
    assert not engine.ready and engine.waiting == 0
    loop.close()


def test_sigterm_during_load_finishes_or_cleanly_refuses_every_request(tmp_path, model):
    """`refrag serve` as its own process: SIGTERM while 12 requests are in flight or queued; every one ends with
    a complete response (a stream with [DONE]) or a clean error status, never a broken connection."""
    import os
    import signal
    import subprocess
    import sys

    from refrag import checkpoint

    path = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "refrag.cli", "serve", "--model", str(path), "--dtype", "float32",
                             "--port", str(port), "--max-batch", "2"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # a tiny model: no thread contention
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        else:
            pytest.fail("the server did not become ready in 60 s")

        async def load():
            async with httpx.AsyncClient(timeout=60) as c:
                async def one(i: int):
                    body = {"model": "refrag", "messages": [{"role": "user", "content": f"q {i}?"}], "max_tokens": 64,
                            "stream": i % 2 == 0, **CONTEXT}
                    r = await c.post(f"{base}/v1/chat/completions", json=body)
                    return r.status_code, r.text

                tasks = [asyncio.ensure_future(one(i)) for i in range(12)]
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(load())
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
    for result in results:
        assert not isinstance(result, BaseException), result  # no reset connection
        status, text = result
        assert status in (200, 503), text
        if status == 200 and text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]")


def test_bench_serve_counts_every_request_and_measures_the_batching_gain(model, tmp_path):
    from refrag.bench.serve import LoadSpec, Prompt, bench_serve, plot_serve

    prompts = [Prompt(f"question {i}?", tuple(PASSAGES)) for i in range(5)]
    spec = LoadSpec(requests=24, max_tokens=4, stream_share=0.5)
    runs = bench_serve(model, None, prompts, spec, concurrency=[1, 6], max_batch=4)
    assert [(r.clients, r.max_batch) for r in runs] == [(1, 4), (6, 4), (6, 1)]
    for r in runs:
        assert sum(s.requests for s in r.modes) == 24 and all(s.ok == s.requests and not s.lost for s in r.modes)
        assert {s.mode for s in r.modes} == {"full", "refrag"} and all(s.ttft_p50_s is not None for s in r.modes)
    assert runs[0].mean_batch == 1.0 and runs[2].mean_batch == 1.0 and runs[1].mean_batch > 1.0
    assert plot_serve(runs, tmp_path / "serve.png").stat().st_size > 0


def test_one_prompt_over_the_window_fails_alone_not_its_whole_batch(model):
    from refrag.config import CompressionOptions, SamplingOptions
    from refrag.errors import InputError
    from refrag.serve.engine import Done, Failed

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(model, None, EngineOptions(max_batch=4))
        full, sampling = CompressionOptions(mode="full"), SamplingOptions(max_new_tokens=2)
        jobs = [Job("q?", tuple(PASSAGES), 1, full, sampling, loop),
                Job("q?", ("fox dog sea " * 400,), 1, full, sampling, loop)]
        for job in jobs:
            engine.submit(job)
        engine.start()  # both are queued before the worker runs: they share one batch
        ends = []
        for job in jobs:
            while not isinstance(event := await asyncio.wait_for(job.events.get(), 30), (Done, Failed)):
                pass
            ends.append(event)
        await asyncio.to_thread(engine.stop)
        return ends

    ok, failed = asyncio.run(main())
    assert isinstance(ok, Done) and isinstance(failed, Failed) and isinstance(failed.error, InputError)
