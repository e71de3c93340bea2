"""`refrag data qa` (the training-set builder) and `refrag train sft` (answering from compressed context)."""

import csv
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEXT, tiny_refrag

from refrag.errors import CheckpointError, InputError
from refrag.modeling import IGNORE_INDEX
from refrag.prompting import PromptTemplate
from refrag.train import qa_data
from refrag.train.common import check_stage_order
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions
from refrag.train.objectives import Example
from refrag.train.qa_data import (
    BLANK,
    QADataOptions,
    QAItem,
    build_qa_set,
    clean_question,
    cloze_question,
    grounded,
    read_items,
)
from refrag.train.sft import RECIPE, SFTOptions, SFTTask, replay_task, sft_examples, train_sft

PASSAGES = [
    ("The river Elbe flows from the Krkonose mountains to the North Sea, passing through Dresden and Hamburg on "
     "the way, after a course of more than a thousand kilometres across Central Europe."),
    ("Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity, and in 1903 she "
     "shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel."),
    ("The city of Lisbon lies on the Atlantic coast, where the Tagus river meets the ocean, and it was largely "
     "rebuilt by the Marquis of Pombal after the earthquake of 1755 destroyed it."),
    ("A violin has four strings tuned in perfect fifths, and it is usually played with a bow made of horsehair; "
     "the instruments made by Antonio Stradivari in Cremona are the most famous of all."),
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": f"t{i}", "text": p}) + "\n" for i, p in enumerate(PASSAGES)))
    return path


def fake_writer(model, pairs, max_new_tokens=24):
    return [f"which question is number {i} of this batch?" for i in range(len(pairs))]


def test_grounded_needs_new_words_found_in_the_passage():
    passage = PASSAGES[1]
    assert grounded("She shared it with Pierre Curie", "who shared the prize?", passage)
    assert not grounded("It was Albert Einstein in Zurich", "who shared the prize?", passage)
    assert not grounded("the prize", "who shared the prize?", passage)  # nothing beyond the question's words


def test_clean_question_refuses_answer_leaks_and_fragments():
    assert clean_question(" when did it happen\nAnswer: 1903", "1903") == "when did it happen?"
    assert clean_question("when did 1903 happen?", "1903") is None
    assert clean_question("why?", "x") is None


@pytest.mark.parametrize("keep", ["grounded", "all"])
def test_builder_keeps_only_answerable_rows_and_never_an_excluded_question(tmp_path, corpus, monkeypatch, keep):
    def teacher(model, items, max_new_tokens=16):  # right (contains the span) for every other row, else off-topic
        return [it.answer if i % 2 == 0 else "zzz qqq" for i, it in enumerate(items)]

    monkeypatch.setattr(qa_data, "write_questions", fake_writer)
    monkeypatch.setattr(qa_data, "_teacher_answers", teacher)
    exclude = tmp_path / "eval.jsonl"  # the question the writer produces for the first candidate is evaluation-only
    options = QADataOptions(examples=50, passages=3, min_words=10, batch_size=8, attempts=1, keep=keep, seed=0)
    banned = fake_writer(None, [("", "")])[0]  # the question written for the first candidate
    exclude.write_text(json.dumps({"question": banned.upper(), "answer": "x"}) + "\n")
    out = tmp_path / "qa.jsonl"
    items = build_qa_set(tiny_refrag(), [corpus], out, options, exclude=[exclude], progress=False)
    assert read_items(out) == items
    assert all(qa_data.normalize_answer(it.question) != qa_data.normalize_answer(banned) for it in items)
    for it in items:
        assert len(it.passages) == 3 and it.context in PASSAGES
        assert it.answer in it.context or not it.verified
        assert len(set(it.passages)) == 3  # distractors are other passages
        if it.verified:
            assert it.teacher == it.answer
    assert all(it.grounded for it in items) == (keep == "grounded")
    if keep == "grounded":
        assert all(it.verified for it in items)  # "zzz qqq" is grounded in no passage


def test_a_cloze_question_blanks_the_span_in_its_own_sentence():
    passage = "Lisbon faces the Atlantic. It was rebuilt by the Marquis of Pombal after the earthquake of 1755."
    assert cloze_question(passage, "Pombal") == (f"Fill in the blank: It was rebuilt by the Marquis of {BLANK} after the "
                                                 "earthquake of 1755.")
    assert cloze_question(passage, "Atlantic") is None  # its sentence is too short to ask anything
    assert cloze_question("Pombal met Pombal in the city of Lisbon in the year 1755.", "Pombal") is None  # gives it away
    assert cloze_question(passage, "Madrid") is None


def test_the_cloze_builder_needs_no_model_and_answers_from_the_passage(tmp_path, corpus):
    exclude = tmp_path / "eval.jsonl"
    options = QADataOptions(examples=50, passages=3, min_words=10, attempts=1, questions="cloze", seed=0)
    first = build_qa_set(None, [corpus], tmp_path / "all.jsonl", options, progress=False)
    exclude.write_text(json.dumps({"question": first[0].question.lower()}) + "\n")
    out = tmp_path / "qa.jsonl"
    items = build_qa_set(None, [corpus], out, options, exclude=[exclude], progress=False)
    assert items and read_items(out) == items and len(items) == len(first) - 1
    assert first[0].question not in {it.question for it in items}
    for it in items:
        assert it.answer == it.teacher and it.verified and it.grounded
        assert BLANK in it.question and it.answer not in it.question
        assert it.question.removeprefix("Fill in the blank: ").replace(BLANK, it.answer) in it.context
        assert len(set(it.passages)) == 3
    with pytest.raises(InputError, match="need a model"):
        build_qa_set(None, [corpus], out, QADataOptions(examples=5, min_words=10), progress=False)


def test_a_file_that_is_not_qa_rows_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(InputError, match="needs question, answer, passages, gold"):
        read_items(bad)


def items(n: int = 12) -> list[QAItem]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        passages = tuple(rng.sample(PASSAGES, 3))
        out.append(QAItem(f"question number {i} about the text?", "Curie", "Marie Curie", passages, 0, "t", True, True))
    return out


def test_the_loss_is_on_the_answer_tokens_only():
    model = tiny_refrag("llama", k=4)
    options = SFTOptions(eval_examples=2)
    examples = sft_examples(model, items(4), options)
    task = SFTTask(examples, examples, options, PromptTemplate.for_tokenizer(model.tokenizer))
    target = model.tokenizer.encode("Marie Curie", add_special_tokens=False) + [model.tokenizer.eos_token_id]
    for ex, layout in zip(examples, task.layouts(model, examples)):
        assert list(ex.target) == target
        labels = layout.labels[layout.labels != IGNORE_INDEX].tolist()
        assert labels == target  # every answer token and EOS, nothing of the prompt or the passages
        assert layout.labels[-len(target):].tolist() == target
        assert int(layout.is_vector.sum()) == len(ex.chunks)  # no chunk expanded here: all compressed
    teacher = task.layouts(model, examples, text=True)
    assert all(int(x.is_vector.sum()) == 0 for x in teacher)
    assert [x.labels[x.labels != IGNORE_INDEX].tolist() for x in teacher] == [target] * len(examples)


def test_expansion_is_applied_to_the_chosen_share_of_examples():
    model = tiny_refrag("llama", k=4)
    options = SFTOptions(policy="first", expand_fraction=0.25, expand_share=0.5, eval_examples=2)
    task = SFTTask(sft_examples(model, items(), options), [], options, PromptTemplate.for_tokenizer(model.tokenizer))
    batch = [ex for step in range(8) for ex in task.examples(step, 4)]
    share = sum(bool(ex.expanded) for ex in batch) / len(batch)
    assert 0.2 < share < 0.8
    assert all(ex.expanded == frozenset(range(len(ex.expanded))) for ex in batch)  # "first" keeps the first chunks
    assert task.examples(3, 4) == task.examples(3, 4)  # a pure function of the step


def test_sft_refuses_a_reconstruct_checkpoint_and_bad_options():
    with pytest.raises(CheckpointError, match="cannot start from a `reconstruct` checkpoint"):
        check_stage_order(RECIPE, "reconstruct")
    check_stage_order(RECIPE, "cpt")
    with pytest.raises(InputError, match="--policy"):
        SFTOptions(policy="similarity")
    with pytest.raises(InputError, match="--target"):
        SFTOptions(target="labels")  # type: ignore[arg-type]


def losses(out) -> list[tuple[int, str]]:
    with (out / "metrics.csv").open() as f:
        return [(int(r["step"]), r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]


def loop(out, **kw) -> TrainOptions:
    base = {"out_dir": out, "steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_every": 3, "save_every": 3,
            "bf16": False, "progress": False, "lr": 3e-3}
    return TrainOptions(**{**base, **kw})


def test_sft_learns_resumes_exactly_and_trains_only_the_compressed_path(tmp_path):
    options = SFTOptions(eval_examples=2, distill=0.3)
    model = tiny_refrag("llama", k=4)
    decoder_before = {n: p.detach().clone() for n, p in model.decoder.named_parameters()}
    result = train_sft(model, items(), options, loop(tmp_path / "a"))
    assert result.final_dir is not None and '"stage": "sft"' in (result.final_dir / "refrag.json").read_text()
    curve = [float(v) for _, v in losses(tmp_path / "a")]
    assert curve[-1] < curve[0]
    for n, p in model.decoder.named_parameters():  # only the adapter moved: full mode is the original decoder
        if "lora_" not in n:
            assert torch.equal(p, decoder_before[n.replace("base_model.model.", "").replace(".base_layer", "")]), n
    model2 = tiny_refrag("llama", k=4)
    assert train_sft(model2, items(), options, loop(tmp_path / "b", stop_after=3)).final_dir is None
    model3 = tiny_refrag("llama", k=4)
    train_sft(model3, items(), options, loop(tmp_path / "b", resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (n, p), (_, q) in zip(model.named_parameters(), model3.named_parameters()):
        assert torch.equal(p, q), n


def test_replay_mixes_text_windows_into_every_batch_scores_them_and_resumes_exactly(tmp_path):
    """--replay: a share of each batch is CPT's next-paragraph windows (so answering cannot undo CPT), scored held
    out under their chunk count; the run stays a pure function of the step."""
    def text(model):
        ids = np.array(model.tokenizer(TEXT * 3)["input_ids"])
        return TokenCorpus(train=ids[:-120], val=ids[-120:])

    options = SFTOptions(eval_examples=2, replay=0.5, replay_chunks=2, replay_tokens=6)
    model = tiny_refrag("llama", k=4)
    result = train_sft(model, items(), options, loop(tmp_path / "a"), replay_corpus=text(model))
    assert set(result.eval) == {0, 1, 2}  # answers all compressed / with expansion, and the replay windows
    with (tmp_path / "a" / "metrics.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r["name"] == "eval/log_ppl_2xk"]
    assert [int(r["step"]) for r in logged] == [0, 3, 6] and float(logged[-1]["value"]) < float(logged[0]["value"])
    task = SFTTask(sft_examples(model, items(), options), [], options, PromptTemplate.for_tokenizer(model.tokenizer),
                   replay_task(text(model), model.k, options))
    batch = task.examples(5, 4)
    windows = [ex for ex in batch if isinstance(ex, Example)]
    assert len(windows) == 2 and all(len(w.context) == 8 and len(w.continuation) == 6 for w in windows)
    assert task.examples(5, 4) == batch
    model2 = tiny_refrag("llama", k=4)
    train_sft(model2, items(), options, loop(tmp_path / "b", stop_after=3), replay_corpus=text(model2))
    model3 = tiny_refrag("llama", k=4)
    train_sft(model3, items(), options, loop(tmp_path / "b", resume=True), replay_corpus=text(model3))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    with pytest.raises(InputError, match="--replay-data"):
        train_sft(tiny_refrag(), items(), options, loop(tmp_path / "c"))
    with pytest.raises(InputError, match="--read text"):
        SFTOptions(replay=0.3, read="text")


def test_too_few_rows_for_the_held_out_split_is_an_error(tmp_path):
    with pytest.raises(InputError, match="held out"):
        train_sft(tiny_refrag(), items(4), SFTOptions(eval_examples=4), loop(tmp_path))


def test_the_text_baseline_trains_a_text_adapter_that_merges_as_a_user_adapter(tmp_path):
    """`--read text` (LLaMA_FT): every chunk raw, a fresh adapter that runs on text; its folder is a user adapter
    (full mode = decoder + it) and its checkpoint never starts a compressor stage."""
    from refrag.train.sft import TEXT_STAGE
    from refrag.user_adapter import merge_user_adapter

    options = SFTOptions(eval_examples=2, read="text")
    model = tiny_refrag("llama", k=4)
    plain = tiny_refrag("llama", k=4).decoder
    projector_before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    task = SFTTask(sft_examples(model, items(4), options), [], options, PromptTemplate.for_tokenizer(model.tokenizer))
    assert all(int(x.is_vector.sum()) == 0 for x in task.layouts(model, task.train_rows))  # every chunk as text
    result = train_sft(model, items(), options, loop(tmp_path / "a"))
    assert f'"stage": "{TEXT_STAGE}"' in (result.final_dir / "refrag.json").read_text()
    curve = [float(v) for _, v in losses(tmp_path / "a")]
    assert curve[-1] < curve[0]
    for n, p in model.projector.named_parameters():  # the compressor does not train
        assert torch.equal(p, projector_before[n]), n
    with pytest.raises(CheckpointError):
        check_stage_order(RECIPE, TEXT_STAGE)
    merged, _ = merge_user_adapter(plain, str(result.final_dir / "decoder_adapter"), None)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert not torch.allclose(merged(ids).logits, tiny_refrag("llama", k=4).decoder(ids).logits)
    with pytest.raises(InputError, match="--distill"):
        SFTOptions(read="text", distill=0.5)
    with pytest.raises(InputError, match="without --init"):
        train_sft(model, items(), options, loop(tmp_path / "b"))  # it already holds an adapter


def test_the_answer_adapter_trains_beside_a_frozen_compressor_resumes_and_reloads(tmp_path):
    """`--learn adapter`: only the new answer adapter moves (the vectors and full mode stay as they were), the run
    resumes exactly, and the checkpoint reloads it beside the compressor's adapter; its compressor cannot be
    trained further as it is."""
    from conftest import with_trained_lora

    from refrag import checkpoint
    from refrag.train.common import StageOptions, set_trainable

    def compressor(folder):
        model = with_trained_lora(folder)
        model.encoder.save(folder / "enc")  # in a folder, so the checkpoint can reference the frozen encoder
        model.config.encoder = str(folder / "enc")
        model.config.extra = {"stage": "cpt"}
        model.set_adapter_scope("chunks")
        return model

    options = SFTOptions(eval_examples=2, learn="adapter")
    model = compressor(tmp_path / "m1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunks = sft_examples(model, items(2), options)[0].chunks
    mixed = SFTTask(sft_examples(model, items(2), options), [], options, PromptTemplate.for_tokenizer(model.tokenizer))
    inputs = model.build_inputs(mixed.layouts(model, mixed.train_rows))
    with torch.no_grad():
        vectors = model.embed_chunks(chunks)
        compressor_logits = model.decoder_logits(inputs)
    result = train_sft(model, items(), options, loop(tmp_path / "a"))
    curve = [float(v) for _, v in losses(tmp_path / "a")]
    assert curve[-1] < curve[0]
    moved = {n for n, p in model.named_parameters() if n not in before or not torch.equal(p, before[n])}
    assert moved and all(".answer." in n for n in moved)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_chunks(chunks), vectors, rtol=0, atol=0)
    text = model.build_inputs([model.layout([[2, 5, 6, 7, 8]])])
    torch.testing.assert_close(model.decoder_logits(text), tiny_refrag("llama").decoder_logits(text))  # full mode
    assert (result.final_dir / "answer_adapter" / "adapter_model.safetensors").is_file()
    manifest = checkpoint.CheckpointManifest.read(result.final_dir)
    assert (manifest.stage, manifest.compressor_stage) == ("sft", "cpt")  # the compressor is still the cpt one
    loaded = checkpoint.load(result.final_dir, progress=False)
    assert loaded.has_answer_adapter and loaded.chunk_scoped
    alone = checkpoint.load(result.final_dir, progress=False, answer_adapter=False)  # the compressor, as it was
    assert not alone.has_answer_adapter and alone.chunk_scoped
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder_logits(inputs), model.decoder_logits(inputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.decoder_logits(inputs), compressor_logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(loaded.decoder_logits(inputs), compressor_logits, atol=1e-3)  # the adapter acts
    with pytest.raises(InputError, match="answer adapter"):
        set_trainable(loaded, StageOptions(train_decoder="lora"), bf16=False)
    model2 = compressor(tmp_path / "m2")
    assert train_sft(model2, items(), options, loop(tmp_path / "b", stop_after=3)).final_dir is None
    model3 = compressor(tmp_path / "m3")
    train_sft(model3, items(), options, loop(tmp_path / "b", resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (n, p), (_, q) in zip(model.named_parameters(), model3.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(InputError, match="--learn adapter"):
        SFTOptions(learn="adapter", replay=0.25)
    with pytest.raises(InputError, match="compressor's decoder adapter"):
        train_sft(tiny_refrag("llama"), items(), options, loop(tmp_path / "c"))


def test_a_stage_started_from_an_answer_adapter_checkpoint_leaves_the_adapter_behind(tmp_path, caplog):
    """`--init` of a checkpoint with an answer adapter: the stage loads its compressor only (with a warning) and
    continues from the compressor's stage (a cpt compressor with an answer adapter still starts cpt or policy), so
    the compressor trains further and `--learn adapter` starts a fresh answer adapter."""
    from conftest import with_trained_lora

    from refrag import checkpoint
    from refrag.train import cpt, policy
    from refrag.train.common import StageOptions, load_for_stage, set_trainable
    from refrag.train.sft import RECIPE

    model = with_trained_lora(tmp_path / "m")
    model.encoder.save(tmp_path / "m" / "enc")
    model.config = replace(model.config, encoder=str(tmp_path / "m" / "enc"),
                           extra={"stage": "sft", "compressor_stage": "cpt"})
    model.set_adapter_scope("chunks")
    model.add_answer_adapter(4)
    folder = checkpoint.save(model, tmp_path / "ckpt")
    for recipe in (cpt.RECIPE, policy.RECIPE):
        assert load_for_stage(recipe, folder, progress=False).config.extra == {"stage": "cpt"}
    with caplog.at_level("WARNING"):
        again = load_for_stage(RECIPE, folder, progress=False)
    assert "answer adapter" in caplog.text
    assert again.has_adapter and not again.has_answer_adapter
    set_trainable(again, StageOptions(train_decoder="lora"), bf16=False)  # no refusal: the compressor trains on
    again.add_answer_adapter(4)
    assert again.has_answer_adapter
