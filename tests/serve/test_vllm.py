"""--backend vllm: the decoder in a vLLM server fed prompt embeddings gives refrag's own greedy answers.

Needs a virtual environment with vllm (`bash scripts/vllm_env.sh`; REFRAG_VLLM_PYTHON or .venv-vllm/bin/python)
and the real offline models; run with `pytest -m vllm tests/serve/test_vllm.py` (minutes on a CPU: vLLM starts).
"""

import os
from pathlib import Path

import pytest

PYTHON = os.environ.get("REFRAG_VLLM_PYTHON", ".venv-vllm/bin/python")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not Path(PYTHON).is_file(), reason=f"no vLLM environment at {PYTHON} "
                                                   "(bash scripts/vllm_env.sh)")]

CONTEXT = [("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by Gustave Eiffel's "
            "company and completed in 1889 for the World's Fair."),
           "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas."]


@pytest.fixture(scope="module")
def served():
    from refrag import load_model
    from refrag.serve.vllm import VLLMGenerator, VLLMOptions, VLLMServer

    model = load_model(dtype="float32", progress=False)  # the shipped compressor: its adapter becomes a vLLM LoRA
    model.set_adapter_scope("sequence")  # its chunk scope is refused (vLLM adapts every token): the machinery test
    model.merge_adapter()
    with VLLMServer(model, VLLMOptions(PYTHON)) as server:
        yield model, VLLMGenerator(server)


@pytest.mark.parametrize("mode", ["full", "refrag"])
def test_vllm_answers_as_refrag_does(served, mode):
    from refrag.config import CompressionOptions, SamplingOptions
    from refrag.generation import Request, generate

    model, vllm = served
    request = Request.from_texts("Who designed the Eiffel Tower?", CONTEXT, model.tokenizer)
    compression = CompressionOptions(mode=mode, policy="lexical", expand_fraction=0.1)
    sampling = SamplingOptions(max_new_tokens=12)
    ours = generate(model, [request], compression=compression, sampling=sampling)[0]
    streamed: list[str] = []
    theirs = vllm(model, [request, request], compression=compression, sampling=sampling,
                  on_text=lambda row, delta: streamed.append(delta) if row == 0 else None)
    assert [a.text for a in theirs] == [ours.text, ours.text]
    assert "".join(streamed).strip() == ours.text
    assert theirs[0].decoder_positions == ours.decoder_positions and theirs[0].expanded_chunks == ours.expanded_chunks
    assert theirs[0].timings.ttft_s > 0 and theirs[0].finish_reason in ("eos", "length")


def test_the_gateway_serves_through_vllm(served):
    from openai import OpenAI

    from refrag.serve.engine import Engine
    from refrag.serve.local import local_server

    model, vllm = served
    with local_server(Engine(model, None, generator=vllm)) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="refrag", max_tokens=8, messages=[
            {"role": "user", "content": "Who designed the Eiffel Tower?"}], extra_body={"passages": CONTEXT})
        assert "Eiffel" in reply.choices[0].message.content
