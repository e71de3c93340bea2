import csv
import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import TEXT, tiny_refrag

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import StageOptions, set_trainable, stage_task
from refrag.train.cpt import cpt
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, evaluate, lr_factor, micro_batches
from refrag.train.mixed import mixed
from refrag.train.objectives import Example
from refrag.train.reconstruct import reconstruct

STAGE = StageOptions(max_chunks=4, eval_per_type=2)


def corpus(model: RefragModel) -> TokenCorpus:
    ids = np.array(model.tokenizer(TEXT * 3)["input_ids"])
    return TokenCorpus(train=ids[:-300], val=ids[-300:])


def options(out: Path, **kw) -> TrainOptions:
    base = {"out_dir": out, "steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_every": 3,
            "save_every": 3, "bf16": False, "progress": False}
    return TrainOptions(**{**base, **kw})


def losses(out: Path) -> list[tuple[int, str]]:
    with (out / "metrics.csv").open() as f:
        return [(int(r["step"]), r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    model = tiny_refrag("llama", k=4)
    reconstruct(model, corpus(model), STAGE, options(tmp_path / "a"))
    model2 = tiny_refrag("llama", k=4)
    stopped = reconstruct(model2, corpus(model2), STAGE, options(tmp_path / "b", stop_after=3))
    assert stopped.steps == 3 and stopped.final_dir is None
    model3 = tiny_refrag("llama", k=4)  # a fresh process would start from the same init
    resumed = reconstruct(model3, corpus(model3), STAGE, options(tmp_path / "b", resume=True))
    assert resumed.steps == 6
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "b")) == 6
    for (n, p), (_, q) in zip(model.named_parameters(), model3.named_parameters()):
        assert torch.equal(p.float(), q.float()), n


def test_a_resume_with_another_adapter_rank_is_refused(tmp_path):
    from refrag.errors import CheckpointError

    lora = StageOptions(max_chunks=4, eval_per_type=2, train_decoder="lora", lora_rank=4)
    model = tiny_refrag("llama", k=4)
    reconstruct(model, corpus(model), lora, options(tmp_path, stop_after=3))
    model2 = tiny_refrag("llama", k=4)
    with pytest.raises(CheckpointError, match="another shape"):
        reconstruct(model2, corpus(model2), replace(lora, lora_rank=8), options(tmp_path, resume=True))


def test_the_untrained_model_is_scored_at_step_0_and_a_resume_does_not_score_it_again(tmp_path):
    model = tiny_refrag("llama", k=4)
    untrained = tiny_refrag("llama", k=4)  # the same init
    reconstruct(model, corpus(model), STAGE, options(tmp_path, stop_after=3))
    reconstruct(model, corpus(model), STAGE, options(tmp_path, resume=True))
    with (tmp_path / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["name"].startswith("eval/log_ppl")]
    assert [int(r["step"]) for r in rows if r["name"] == rows[0]["name"]] == [0, 3, 6]
    set_trainable(untrained, STAGE, bf16=False)
    task = stage_task("reconstruct", untrained, corpus(untrained), STAGE, 6 * 4)  # what reconstruct() builds
    at_start = evaluate(untrained, task, 2, bf16=False)
    logged = {r["name"]: float(r["value"]) for r in rows if r["step"] == "0"}
    assert logged == pytest.approx({f"eval/log_ppl_{n}xk": s.log_ppl for n, s in at_start.items()}, rel=1e-4)


def test_only_encoder_and_projector_train_in_reconstruction(tmp_path):
    model = tiny_refrag("llama", k=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reconstruct(model, corpus(model), STAGE, options(tmp_path, steps=2, eval_every=0, save_every=0))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("encoder.", "projector.")) for n in changed)
    manifest = (tmp_path / "final" / "refrag.json").read_text()  # records the stage, references the decoder
    assert '"stage": "reconstruct"' in manifest and '"decoder": "tiny-llama"' in manifest
    assert (tmp_path / "final" / "encoder").is_dir() and not (tmp_path / "final" / "decoder").exists()


def test_cpt_and_mixed_validate_their_options(tmp_path):
    model = tiny_refrag("llama", k=4)
    with pytest.raises(InputError, match="continuation"):
        cpt(model, corpus(model), STAGE, options(tmp_path))
    with pytest.raises(InputError, match="expand-fraction"):
        mixed(model, corpus(model), StageOptions(continuation_tokens=8), options(tmp_path))
    with pytest.raises(InputError, match="decoder frozen"):
        reconstruct(model, corpus(model), StageOptions(continuation_tokens=8), options(tmp_path))
    with pytest.raises(InputError, match="frozen or lora"):  # full training would change the text-only decoder
        reconstruct(model, corpus(model), StageOptions(train_decoder="full"), options(tmp_path))


def test_mixed_trains_with_expanded_chunks(tmp_path, monkeypatch):
    """The expanded chunks of mixed-input training reach the decoder as their raw tokens, in place."""
    from refrag.train import objectives

    seen = []
    layouts_of = objectives.example_layouts

    def spy(model, examples):
        layouts = layouts_of(model, examples)
        seen.extend(zip(examples, layouts))
        return layouts

    monkeypatch.setattr(objectives, "example_layouts", spy)
    model = tiny_refrag("llama", k=4)
    result = mixed(model, corpus(model), StageOptions(max_chunks=4, continuation_tokens=6, expand_fraction=0.5,
                                                      train_decoder="full", eval_per_type=2),
                   options(tmp_path, steps=2))
    assert np.isfinite(result.final_loss) and (tmp_path / "final" / "decoder").is_dir()
    expanded = [(ex, lay) for ex, lay in seen if ex.expanded]
    assert expanded  # p = 0.5 over 2 steps x 8 examples: some chunks were expanded
    for ex, lay in expanded:
        n = len(ex.context) // 4
        assert int(lay.is_vector.sum()) == n - len(ex.expanded)  # one vector per compressed chunk only
        pos = 1  # after the start token
        for i in range(n):
            if i in ex.expanded:
                assert lay.token_ids[pos : pos + 4].tolist() == list(ex.context[4 * i : 4 * i + 4])
                assert not lay.is_vector[pos : pos + 4].any()
                pos += 4
            else:
                assert lay.is_vector[pos]
                pos += 1


def test_warmup_then_cosine():
    opts = options(Path("."), steps=100)
    f = [lr_factor(s, opts) for s in range(100)]
    assert f[0] == 0.25 and f[3] == 1.0  # 4% warm-up = 4 steps
    assert all(a >= b for a, b in itertools.pairwise(f[3:])) and f[-1] < 0.01


def _rank_main(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    model = tiny_refrag("llama", k=4)
    reconstruct(model, corpus(model), STAGE, options(Path(out) / "run", steps=3, eval_every=0, save_every=0))
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    torch.save(flat, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_data_parallel_ranks_agree(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(str(tmp_path), port), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    fresh = torch.cat([p.detach().float().flatten() for p in tiny_refrag("llama", k=4).parameters()])
    assert torch.equal(a, b) and not torch.equal(a, fresh)


@pytest.mark.parametrize("recipe, continuation", [(reconstruct, 0), (cpt, 6)])
def test_lora_trains_the_adapter_not_the_decoder(tmp_path, recipe, continuation):
    model = tiny_refrag("llama", k=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = StageOptions(max_chunks=4, continuation_tokens=continuation, train_decoder="lora", lora_rank=4,
                         eval_per_type=2)
    recipe(model, corpus(model), stage, options(tmp_path, steps=2, eval_every=0, save_every=0))
    assert model.has_adapter
    params = dict(model.named_parameters())
    base = {n: p for n, p in params.items() if n.startswith("decoder.") and "lora_" not in n}
    assert all(not p.requires_grad for p in base.values())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in params.items())  # B starts at zero: it trained
    # the base decoder did not move (peft renames wrapped layers: compare by the original names)
    originals = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in base.items()}
    assert all(torch.equal(originals[n].float(), before[n].float()) for n in before if n.startswith("decoder."))
    final = tmp_path / "final"
    assert (final / "decoder_adapter").is_dir() and not (final / "decoder").exists()
    with pytest.raises(InputError, match="--train-decoder lora"):
        cpt(model, corpus(model), StageOptions(continuation_tokens=6, train_decoder="full"), options(tmp_path / "b"))


def test_a_chunk_scoped_adapter_trains_and_its_checkpoint_keeps_the_scope(tmp_path):
    from refrag.checkpoint import CheckpointManifest

    model = tiny_refrag("llama", k=4)
    stage = StageOptions(max_chunks=4, continuation_tokens=6, train_decoder="lora", lora_rank=4, eval_per_type=2,
                         adapter_scope="chunks")
    cpt(model, corpus(model), stage, options(tmp_path, steps=2, eval_every=0, save_every=0))
    assert model.chunk_scoped
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # gradient reached it
    assert CheckpointManifest.read(tmp_path / "final").config.adapter_scope == "chunks"
    with pytest.raises(InputError, match="--adapter-scope"):
        StageOptions(adapter_scope="tokens")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs --train-decoder lora"):
        set_trainable(tiny_refrag("llama", k=4), StageOptions(adapter_scope="chunks"), bf16=False)


def test_gradient_checkpointing_recomputes_a_chunk_scoped_adapter_with_its_mask(tmp_path):
    """Backward re-runs checkpointed layers after decoder_for has exited: the mask travels with them."""
    model = tiny_refrag("llama", k=4)
    stage = StageOptions(max_chunks=4, continuation_tokens=6, train_decoder="lora", lora_rank=4, eval_per_type=2,
                         adapter_scope="chunks")
    cpt(model, corpus(model), stage, options(tmp_path, steps=1, eval_every=0, save_every=0,
                                             gradient_checkpointing=True))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_micro_batches_group_similar_lengths_and_keep_every_example():
    examples = [Example(context=tuple(range(n * 4)), continuation=()) for n in (8, 1, 4, 1, 8, 2)]
    groups = micro_batches(examples, 2)
    assert [[len(ex.context) for ex in g] for g in groups] == [[4, 4], [8, 16], [32, 32]]
    assert sorted(map(id, itertools.chain(*groups))) == sorted(map(id, examples))


def test_a_frozen_encoder_stays_as_it_was():
    model = tiny_refrag("llama", k=4)
    set_trainable(model, StageOptions(train_encoder=False), bf16=False)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    set_trainable(model, StageOptions(), bf16=False)
    assert all(p.requires_grad for p in model.encoder.parameters())


def test_a_time_box_stops_with_a_checkpoint_and_resumes(tmp_path):
    model = tiny_refrag("llama", k=4)
    boxed = reconstruct(model, corpus(model), STAGE, options(tmp_path, max_minutes=1e-9))
    assert boxed.steps == 1 and boxed.final_dir is None  # the box is spent after the first step
    assert (tmp_path / "checkpoint" / "model" / "refrag.json").is_file()
    model2 = tiny_refrag("llama", k=4)
    assert reconstruct(model2, corpus(model2), STAGE, options(tmp_path, resume=True)).steps == 6
    with pytest.raises(InputError, match="max-minutes"):
        options(tmp_path, max_minutes=0)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    import signal

    from refrag.train import loop

    accumulate, calls = loop._accumulate, []

    def terminated_during_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's preemption would
        return accumulate(*args)

    monkeypatch.setattr(loop, "_accumulate", terminated_during_step_2)
    # the handlers in place before (SIGINT starts ignored in a background job, e.g. under `nohup ... &`)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    model = tiny_refrag("llama", k=4)
    stopped = reconstruct(model, corpus(model), STAGE, options(tmp_path / "b", save_every=0))
    assert stopped.steps == 2 and stopped.final_dir is None
    assert (tmp_path / "b" / "checkpoint" / "model" / "refrag.json").is_file()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored after training
    monkeypatch.setattr(loop, "_accumulate", accumulate)
    model2 = tiny_refrag("llama", k=4)
    assert reconstruct(model2, corpus(model2), STAGE, options(tmp_path / "b", resume=True)).steps == 6
    model3 = tiny_refrag("llama", k=4)
    reconstruct(model3, corpus(model3), STAGE, options(tmp_path / "a"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_self_encoder_trains_and_its_adapter_is_saved(tmp_path):
    """Stage 1 with the decoder's own first layers as the chunk encoder: only the adapter trains and is saved."""
    from dataclasses import replace

    from conftest import make_tokenizer, tiny_decoder

    from refrag import checkpoint
    from refrag.encoders import build_encoder

    tok = make_tokenizer()
    decoder = tiny_decoder("llama", len(tok))
    decoder.save_pretrained(tmp_path / "dec")
    tok.save_pretrained(tmp_path / "dec")
    base = tiny_refrag("llama", k=4)
    config = replace(base.config, decoder=str(tmp_path / "dec"), encoder="self", encoder_layers=1,
                     encoder_lora_rank=2)
    model = RefragModel(config, build_encoder(config, decoder, tok), decoder, tok)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    reconstruct(model, corpus(model), STAGE, options(tmp_path / "run", steps=2))
    changed = {n for n, p in model.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    loaded = checkpoint.load(tmp_path / "run" / "final", dtype="float32", progress=False)
    chunks = ["Paris is the capital", "of France."]
    torch.testing.assert_close(loaded.embed_chunks(chunks), model.embed_chunks(chunks))
