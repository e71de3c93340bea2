"""`refrag bench serve`: a bounded load generator against the real server on localhost.

For each concurrency level, a fresh engine and server (``serve.local``); N concurrent clients send M requests
in total, modes (full / refrag) interleaved and a seeded share streaming, so both modes meet the same machine
load in the same run. Per mode: completed requests and tokens per second of the run's wall time, p50 / p99 of
the time to the first streamed text (TTFT, streaming requests) and of the end-to-end latency, errors by status,
lost responses (a stream without ``[DONE]`` or a body without an answer). The batching gain: the highest
concurrency run again with ``max_batch = 1`` (one request at a time).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from refrag.bench.plots import save_figure
from refrag.config import Mode
from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.pipeline import Pipeline
from refrag.serve.app import ServeOptions
from refrag.serve.engine import Engine, EngineOptions
from refrag.serve.local import local_server


@dataclass(frozen=True)
class Prompt:
    question: str
    passages: tuple[str, ...] | None  # None: the server retrieves from its index


@dataclass(frozen=True)
class LoadSpec:
    requests: int = 500
    modes: tuple[Mode, ...] = ("full", "refrag")
    stream_share: float = 0.5
    max_tokens: int = 16
    top_k: int = 3
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.modes or not 0 <= self.stream_share <= 1 or self.max_tokens < 1:
            raise InputError("need --requests >= 1, at least one mode, --stream-share in [0, 1], --max-tokens >= 1.")


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    mode: str
    stream: bool
    status: int  # HTTP status (0: no response: connection error)
    latency_s: float
    ttft_s: float | None  # streaming: first text chunk
    tokens: int
    complete: bool  # a stream that ended with [DONE] / a body with an answer


@dataclass(frozen=True)
class ModeStats:
    mode: str
    requests: int
    ok: int
    lost: int  # 200 but incomplete
    errors: dict[str, int]  # status -> count
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float
    latency_p99_s: float


@dataclass(frozen=True)
class LoadRun:
    clients: int
    max_batch: int
    wall_s: float
    modes: list[ModeStats]
    batches: int  # generate calls the engine made
    mean_batch: float
    outcomes: list[Outcome] = field(repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("outcomes")
        return out


def _quantile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarise(outcomes: Sequence[Outcome], modes: Sequence[str], wall_s: float) -> list[ModeStats]:
    stats = []
    for mode in modes:
        rows = [o for o in outcomes if o.mode == mode]
        ok = [o for o in rows if o.status == 200 and o.complete]
        errors = Counter(str(o.status) for o in rows if o.status != 200)
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        latency = [o.latency_s for o in ok]
        stats.append(ModeStats(
            mode=mode, requests=len(rows), ok=len(ok), lost=sum(o.status == 200 and not o.complete for o in rows),
            errors=dict(errors), requests_per_s=len(ok) / wall_s, tokens_per_s=sum(o.tokens for o in ok) / wall_s,
            ttft_p50_s=_quantile(ttft, 0.5), ttft_p99_s=_quantile(ttft, 0.99),
            latency_p50_s=_quantile(latency, 0.5) or 0.0, latency_p99_s=_quantile(latency, 0.99) or 0.0,
        ))
    return stats


async def _one(client: httpx.AsyncClient, base: str, model_id: str, prompt: Prompt, mode: str, stream: bool,
               spec: LoadSpec) -> Outcome:
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt.question}], "mode": mode,
            "max_tokens": spec.max_tokens, "top_k": spec.top_k, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            **({"passages": list(prompt.passages)} if prompt.passages is not None else {})}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(f"{base}/v1/chat/completions", json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return Outcome(mode, False, r.status_code, latency, None, 0, False)
            data = r.json()
            complete = bool(data.get("choices")) and data["choices"][0]["message"]["content"] is not None
            return Outcome(mode, False, 200, latency, None, data["usage"]["completion_tokens"], complete)
        ttft, tokens, done = None, 0, False
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(mode, True, r.status_code, time.perf_counter() - t0, None, 0, False)
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif ttft is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - t0
        return Outcome(mode, True, 200, time.perf_counter() - t0, ttft, tokens, done)
    except httpx.HTTPError:
        return Outcome(mode, stream, 0, time.perf_counter() - t0, None, 0, False)


async def drive(base: str, model_id: str, prompts: Sequence[Prompt], spec: LoadSpec, clients: int,
                progress: bool = False) -> list[Outcome]:
    """``spec.requests`` requests from ``clients`` concurrent clients (each sends its next when one returns)."""
    rng = random.Random(spec.seed)
    plan = [(prompts[i % len(prompts)], spec.modes[i % len(spec.modes)], rng.random() < spec.stream_share)
            for i in range(spec.requests)]
    todo = iter(plan)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    bar = tqdm(total=len(plan), desc=f"load, {clients} clients", unit="req", disable=not progress)
    async with httpx.AsyncClient(timeout=spec.timeout_s, limits=limits) as client:
        async def worker() -> None:
            for prompt, mode, stream in todo:
                outcomes.append(await _one(client, base, model_id, prompt, mode, stream, spec))
                bar.update()

        await asyncio.gather(*(worker() for _ in range(clients)))
    bar.close()
    return outcomes


def run_load(model: RefragModel, pipeline: Pipeline | None, prompts: Sequence[Prompt], spec: LoadSpec,
             clients: int, max_batch: int, progress: bool = False) -> LoadRun:
    engine = Engine(model, pipeline, EngineOptions(max_batch=max_batch, max_queue=max(64, 2 * clients)))
    options = ServeOptions(timeout_s=spec.timeout_s, max_tokens_cap=max(512, spec.max_tokens))
    with local_server(engine, options) as base:
        t0 = time.perf_counter()
        outcomes = asyncio.run(drive(base, options.model_id, prompts, spec, clients, progress))
        wall = time.perf_counter() - t0
    return LoadRun(clients, max_batch, wall, summarise(outcomes, spec.modes, wall), engine.batches,
                   engine.batched_jobs / max(engine.batches, 1), outcomes)


def bench_serve(model: RefragModel, pipeline: Pipeline | None, prompts: Sequence[Prompt], spec: LoadSpec,
                concurrency: Sequence[int], max_batch: int = 8, *, progress: bool = False,
                on_run: Callable[[LoadRun], None] | None = None) -> list[LoadRun]:
    """One run per concurrency level, then the highest level with max_batch = 1 (the batching gain);
    ``on_run`` sees each run as it finishes (so a long benchmark reports as it goes)."""
    if not prompts:
        raise InputError("no prompts to send.")
    levels = [(c, max_batch) for c in concurrency] + ([(max(concurrency), 1)] if max_batch > 1 else [])
    runs = []
    for clients, batch in levels:
        runs.append(run_load(model, pipeline, prompts, spec, clients, batch, progress))
        if on_run is not None:
            on_run(runs[-1])
    return runs


def plot_serve(runs: Sequence[LoadRun], path: str | Path) -> Path:
    """PNG: p50 / p99 end-to-end latency per mode vs concurrency (batched runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batched = [r for r in runs if r.max_batch > 1] or list(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, mode in enumerate(s.mode for s in batched[0].modes):
        xs = [r.clients for r in batched]
        stats = [next(s for s in r.modes if s.mode == mode) for r in batched]
        ax.plot(xs, [s.latency_p50_s for s in stats], "o-", color=f"C{i}", label=f"{mode} p50")
        ax.plot(xs, [s.latency_p99_s for s in stats], "o--", color=f"C{i}", label=f"{mode} p99")
    ax.set(xlabel="concurrent clients", ylabel="end-to-end latency (s)", xscale="log",
           title=f"refrag serve: latency vs concurrency (max batch {batched[0].max_batch})")
    ax.set_xticks([r.clients for r in batched], [str(r.clients) for r in batched])
    return save_figure(fig, ax, path)
