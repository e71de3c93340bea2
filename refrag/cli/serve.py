"""`refrag serve`: the OpenAI-compatible RAG server (needs the `serve` extra: fastapi + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import ModelChoice, model_options, setup_torch


@model_options()
def serve_cmd(
    index_path: Annotated[Path | None, typer.Argument(help="index to retrieve from (optional: without one, "
                                                           "requests pass their context in `passages`)")] = None,
    host: Annotated[str, typer.Option(help="interface to bind (127.0.0.1: this machine only; 0.0.0.0 exposes "
                                           "it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="REFRAG_API_KEY", help="require `Authorization: Bearer "
                                                                              "KEY` (or set REFRAG_API_KEY)")] = None,
    model_id: Annotated[str, typer.Option(help="the model name clients send (and /v1/models lists)")] = "refrag",
    max_batch: Annotated[int, typer.Option(help="requests the decoder runs at once")] = 8,
    max_queue: Annotated[int, typer.Option(help="requests allowed to wait; more get 429")] = 64,
    timeout: Annotated[float, typer.Option(help="seconds per request, queueing included (504 after)")] = 120.0,
    max_body_bytes: Annotated[int, typer.Option(help="larger request bodies get 413")] = 1 << 20,
    backend: Annotated[str, typer.Option(help="hf: the decoder runs here; vllm: in a vLLM server on 127.0.0.1 "
                                              "that refrag starts and feeds prompt embeddings")] = "hf",
    vllm_python: Annotated[str, typer.Option(envvar="REFRAG_VLLM_PYTHON", help="python of the virtual environment "
                                                                              "with vllm (scripts/vllm_env.sh)")]
        = ".venv-vllm/bin/python",
    vllm_args: Annotated[str, typer.Option(help="more vLLM flags, e.g. '--tensor-parallel-size 2'")] = "",
    *,
    choice: ModelChoice,
) -> None:
    """Serve /v1/chat/completions, /v1/completions (streaming), /v1/models, /v1/search, /health and /ready."""
    setup_torch()
    import shlex
    from contextlib import ExitStack

    from refrag.errors import InputError, MissingPackageError

    if backend not in ("hf", "vllm"):
        raise InputError(f"--backend must be hf or vllm (got {backend!r}).")
    if backend == "vllm" and not Path(vllm_python).is_file():
        raise InputError(f"{vllm_python} not found: create the vLLM environment with `bash scripts/vllm_env.sh` "
                         "(or point --vllm-python / REFRAG_VLLM_PYTHON at one).")

    try:
        import uvicorn

        from refrag.serve.app import ServeOptions, create_app
    except ImportError as e:
        raise MissingPackageError("refrag serve", "pip install 'refrag[serve]'") from e
    from refrag.serve.engine import Engine, EngineOptions

    pipeline = None
    if index_path is not None:
        pipeline = choice.pipeline(index_path)
        model = pipeline.model
    else:
        model = choice.load()
    with ExitStack() as stack:
        generator = None
        if backend == "vllm":
            from refrag.serve.vllm import VLLMGenerator, VLLMOptions, VLLMServer

            typer.echo("starting vLLM on 127.0.0.1 (minutes on a CPU) ...", err=True)
            server = stack.enter_context(VLLMServer(model, VLLMOptions(vllm_python, extra_args=tuple(
                shlex.split(vllm_args)))))
            generator = VLLMGenerator(server)
        engine = Engine(model, pipeline, EngineOptions(max_batch=max_batch, max_queue=max_queue), generator)
        options = ServeOptions(model_id=model_id, api_key=api_key, timeout_s=timeout, max_body_bytes=max_body_bytes)
        typer.echo(f"serving {model_id!r} on http://{host}:{port}/v1 (index: {index_path or 'none'}; backend: "
                   f"{backend}; API key: {'required' if api_key else 'none'})", err=True)
        uvicorn.run(create_app(engine, options), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=int(timeout))
