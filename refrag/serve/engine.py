"""The server's engine: a bounded queue of jobs and one worker thread that runs the decoder on batches.

A job is one question (retrieved passages, or passages given in the request) with its compression and sampling
options. The worker takes the oldest job and every queued job that can share its ``generate`` call (same
compression and sampling options), up to ``max_batch``: the prefill runs batched, decoding continues per row
(a row stops at its own EOS / stop string, or when its job is cancelled: client gone, timeout). Text reaches
the job's event loop through ``call_soon_threadsafe``; the job ends with exactly one ``Done`` or ``Failed``.

Admission: a full queue refuses at once (``QueueFull``: the server answers 429 with Retry-After); after
``stop()`` new jobs are refused (``ShuttingDown``: 503), the batch in flight finishes, queued jobs fail cleanly.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from refrag.config import ChunkingOptions, CompressionOptions, SamplingOptions
from refrag.errors import InputError, RefragError
from refrag.generation import Answer, Request, generate
from refrag.index import SearchHit
from refrag.modeling import RefragModel
from refrag.pipeline import Pipeline
from refrag.relevance import Dropped, HitFilter


class QueueFull(RefragError):
    """Too many jobs waiting: try again later."""


class ShuttingDown(RefragError):
    """The engine no longer takes jobs."""


@dataclass(frozen=True)
class EngineOptions:
    max_batch: int = 8  # jobs per generate call
    max_queue: int = 64  # jobs waiting; more are refused (429)
    batch_wait_s: float = 0.005  # after the first job, how long to wait for others to join its batch


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    answer: Answer
    hits: tuple[SearchHit, ...]
    dropped: tuple[Dropped, ...]  # retrieved but filtered out
    retrieval_s: float
    queue_s: float  # waiting for the worker


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | Done | Failed


@dataclass
class Job:
    """One question for the worker, and the channel its events come back on."""

    question: str
    passages: tuple[str, ...] | None  # given in the request; None: retrieve top_k from the index
    top_k: int
    compression: CompressionOptions
    sampling: SamplingOptions
    loop: asyncio.AbstractEventLoop
    hit_filter: HitFilter = HitFilter()  # relevance filtering of retrieved passages
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def batch_key(self) -> tuple:
        return (self.compression, self.sampling)

    def send(self, event: Event) -> None:
        """From the worker thread: hand an event to the job's event loop (dropped when that loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down)
            pass


class Engine:
    """Owns the model (and the index's pipeline); ``submit`` queues a job, the worker thread answers it."""

    def __init__(self, model: RefragModel, pipeline: Pipeline | None = None,
                 options: EngineOptions = EngineOptions(), generator: Callable[..., list[Answer]] | None = None) -> None:
        """``generator``: None for ``generate`` (the decoder in this process), or a drop-in with its signature,
        such as ``refrag.serve.vllm.VLLMGenerator`` (the decoder in a vLLM server)."""
        self.model, self.pipeline, self.options, self.generator = model, pipeline, options, generator
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=options.max_queue)
        self._held: list[Job] = []  # taken from the queue but not batchable with the current batch
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="refrag-engine", daemon=True)
        self.batches = 0  # generate calls made (stats, tests)
        self.batched_jobs = 0
        self.finish_reasons: Counter[str] = Counter()

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down.")
        try:
            self._queue.put_nowait(job)
        except queue.Full as e:
            raise QueueFull(f"{self.options.max_queue} requests are already waiting.") from e

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, let the batch in flight finish, fail the queued ones, join the worker."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        for job in self._drain():
            job.send(Failed(ShuttingDown("the server shut down before this request ran.")))

    def _drain(self) -> list[Job]:
        """Every job not yet run: the held ones, then the queue's."""
        jobs, self._held = self._held, []
        return jobs + self._drain_queue()

    # ---------------------------------------------------------------- the worker thread
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Job]:
        """The oldest live job and the queued jobs that can share its generate call."""
        if not self._held:
            try:
                self._held.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
            time.sleep(self.options.batch_wait_s)  # let concurrent arrivals join
        self._held += self._drain_queue()
        live = [j for j in self._held if not j.cancelled.is_set()]
        for j in self._held:
            if j.cancelled.is_set():
                j.send(Failed(asyncio.CancelledError()))
        if not live:
            self._held = []
            return []
        key = live[0].batch_key
        batch = [j for j in live if j.batch_key == key][: self.options.max_batch]
        self._held = [j for j in live if j not in batch]
        return batch

    def _drain_queue(self) -> list[Job]:
        out = []
        while len(out) + len(self._held) < self.options.max_queue:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _run(self, jobs: Sequence[Job]) -> None:
        started = time.perf_counter()
        prepared = []
        for job in jobs:
            try:
                prepared.append((job, *self._request(job)))
            except Exception as e:  # noqa: BLE001 -- a bad passage or a failed retrieval fails that job only
                job.send(Failed(e))
        if prepared:
            self._generate(prepared, started)

    def _generate(self, prepared: list, started: float) -> None:
        """One generate call for the batch; when it fails (e.g. one prompt exceeds the decoder window), each job
        runs alone, so only the job at fault gets the error."""
        live = [p[0] for p in prepared]
        try:
            answers = (self.generator or generate)(
                self.model, [p[1] for p in prepared], compression=live[0].compression, sampling=live[0].sampling,
                on_text=lambda row, text: live[row].send(Delta(text)),
                cancelled=lambda row: live[row].cancelled.is_set(),
            )
        except Exception as e:  # noqa: BLE001 -- the worker must survive any request
            if len(prepared) > 1:
                for one in prepared:
                    self._generate([one], started)
            else:
                live[0].send(Failed(e))
            return
        self.batches += 1
        self.batched_jobs += len(live)
        for (job, _, hits, dropped, retrieval_s), answer in zip(prepared, answers):
            self.finish_reasons[answer.finish_reason] += 1
            job.send(Done(answer, hits, dropped, retrieval_s, started - job.enqueued))

    def _request(self, job: Job) -> tuple[Request, tuple[SearchHit, ...], tuple[Dropped, ...], float]:
        if job.passages is not None:
            chunking = ChunkingOptions(k=self.model.k)
            return Request.from_texts(job.question, list(job.passages), self.model.tokenizer, chunking), (), (), 0.0
        if self.pipeline is None:
            raise InputError("this server has no index: pass the context in the request's `passages` field.")
        found = self.pipeline.retrieve(job.question, top_k=job.top_k, compression=job.compression,
                                       hit_filter=job.hit_filter)
        return found.request, found.hits, found.dropped, found.seconds
