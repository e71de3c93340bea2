"""`refrag train policy`: GRPO through the shared loop, on a synthetic task whose right chunks are known."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from refrag import checkpoint
from refrag.chunking import chunk_token_ids
from refrag.errors import InputError
from refrag.train.loop import TrainOptions, train
from refrag.train.policy import PolicyOptions, PolicyTask, prepare
from tests.conftest import tiny_refrag

MARK = 7  # the token the synthetic reward looks for


def marker_reward(model, examples):
    """Share of the context's marker tokens that sit in expanded chunks (the right chunks are the marked ones)."""
    out = []
    for ex in examples:
        chunks = chunk_token_ids(ex.context, model.tokenizer, model.k)
        marks = [sum(t == MARK for t in c.token_ids) for c in chunks]
        out.append(sum(marks[i] for i in ex.expanded) / max(sum(marks), 1))
    return out


def stream(n: int, seed: int) -> np.ndarray:
    """Random tokens with runs of 6 markers (one run per ~64 tokens: a run covers one or two chunks of 4)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, n)
    for start in np.nonzero(rng.random(n) < 1 / 64)[0]:
        tokens[start : start + 6] = MARK
    return tokens


def test_grpo_learns_to_expand_the_marked_chunks(tmp_path):
    torch.manual_seed(0)
    model = tiny_refrag("llama", k=4)
    options = PolicyOptions(fraction=0.25, context_chunks=8, continuation_tokens=4, group=8, reuse=2, hidden=32,
                            layers=1, eval_examples=8)
    prepare(model, options)
    task = PolicyTask(stream(20_000, 0), stream(2_000, 1), model.k, options, reward=marker_reward)
    held_out = task._windows(task.val_tokens, 64, np.random.default_rng(5))

    def reward_of(scores) -> float:  # the mean reward of the top-T' chunks by these scores
        chosen = [replace(ex, expanded=tuple(row.topk(task.count).indices.tolist())) for ex, row in zip(held_out, scores)]
        return float(np.mean(marker_reward(model, chosen)))

    def greedy() -> float:
        enc = task._encode(model, held_out)
        with torch.no_grad():
            return reward_of(model.policy_network(enc, torch.ones(enc.shape[:2], dtype=torch.bool)))

    marks = torch.tensor([[float(sum(t == MARK for t in c.token_ids)) for c in chunk_token_ids(ex.context, model.tokenizer, 4)]
                          for ex in held_out])
    oracle, before = reward_of(marks + 1e-3 * torch.rand_like(marks)), greedy()
    result = train(model, task, TrainOptions(tmp_path / "run", steps=30, batch_size=16, micro_batch_size=16,
                                             lr=3e-3, bf16=False, eval_every=0, save_every=10, progress=False))
    after = greedy()
    assert before < 0.6 * oracle and after > 0.9 * oracle, (before, after, oracle)
    assert set(result.eval) == {1, -1}  # held-out log-ppl with the greedy and with a random selection
    manifest = checkpoint.CheckpointManifest.read(result.final_dir)
    assert manifest.stage == "policy" and manifest.policy == "policy" and (result.final_dir / "policy").is_dir()


def test_rollouts_are_reused_for_the_ppo_epochs_and_examples_depend_only_on_the_step():
    model = tiny_refrag("llama", k=4)
    options = PolicyOptions(context_chunks=4, continuation_tokens=3, group=2, reuse=3, hidden=16, layers=1)
    prepare(model, options)
    task = PolicyTask(stream(2_000, 0), stream(500, 1), model.k, options, reward=marker_reward)
    assert task.examples(0, 2) == task.examples(2, 2) != task.examples(3, 2)
    optimizer = torch.optim.SGD(model.policy_network.parameters(), lr=1.0)
    torch.nn.init.normal_(model.policy_network.head.weight)  # a non-uniform policy, so a step moves the ratio
    first = task._rollouts(model, task.examples(0, 2))
    task._cache = {tuple(task.examples(0, 2)): first}
    task.loss(model, task.examples(0, 2)).backward()
    optimizer.step()
    task.loss(model, task.examples(1, 2))
    assert task._cache[tuple(task.examples(1, 2))] is first  # the same rollouts: ratio against the sampler
    from refrag.learned_policy import order_log_prob

    moved = torch.cat([order_log_prob(model.policy_network.score(enc)[None], rows[None])
                       for (enc, _), rows in zip(first.inputs, first.orders)])
    assert not torch.allclose(moved, first.old_log_prob)  # the second PPO epoch sees a ratio != 1
    assert all(p.requires_grad == n.startswith("policy_network.") for n, p in model.named_parameters())


def test_bad_policy_options_are_clear():
    with pytest.raises(InputError, match="expand-fraction"):
        PolicyOptions(fraction=-0.1)
    with pytest.raises(InputError, match="group"):
        PolicyOptions(group=1)


FILLER = ["the", "cat", "sat", "on", "a", "mat", "and", "a", "dog", "ran", "in", "the", "park", "with", "a", "red", "ball"]


def keyword_rows(n: int, seed: int):
    """QA rows whose answer sits where the question's rare word is: three passages of filler, one of them
    holding the word (so the right chunk is known, and only a policy that reads the question can find it)."""
    from refrag.train.qa_data import QAItem

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        word = ["zebra", "violin", "comet", "harbour"][i % 4]
        passages = [" ".join(rng.choice(FILLER, 40)) for _ in range(3)]
        where = int(rng.integers(3))
        words = passages[where].split()
        at = int(rng.integers(len(words)))
        passages[where] = " ".join(words[:at] + [word, word] + words[at:])
        rows.append(QAItem(f"where is the {word}?", word, word, tuple(passages), where, "t", True, True))
    return rows


def keyword_reward(model, examples):
    """1 when a raw chunk holds the question's word (whole: a word cut between two chunks is in neither)."""
    return [float(any(ex.question.split()[-1][:-1] in ex.chunks[i].text for i in ex.expanded)) for ex in examples]


def test_a_query_conditioned_policy_learns_the_qa_task_where_the_right_chunk_is_known(tmp_path):
    from refrag.prompting import PromptTemplate
    from refrag.train.policy import QAPolicyTask
    from refrag.train.sft import SFTOptions, SFTTask, sft_examples

    torch.manual_seed(0)
    model = tiny_refrag("llama", k=8)
    options = PolicyOptions(task="qa", fraction=0.1, group=8, reuse=2, hidden=32, layers=1, eval_examples=8)
    assert options.query_conditioned
    prepare(model, options)
    sft = SFTOptions(expand_share=0.0, eval_examples=8)
    rows = sft_examples(model, keyword_rows(72, 0), sft)
    task = QAPolicyTask(SFTTask(rows[:64], rows[64:], sft, PromptTemplate.for_tokenizer(model.tokenizer)), options,
                        reward=keyword_reward)
    held_out = sft_examples(model, keyword_rows(48, 9), sft)

    def greedy() -> float:
        return float(np.mean(keyword_reward(model, task._greedy(model, held_out))))

    oracle = float(np.mean([any(ex.question.split()[-1][:-1] in c.text for c in ex.chunks) for ex in held_out]))
    before = greedy()
    result = train(model, task, TrainOptions(tmp_path / "run", steps=40, batch_size=16, micro_batch_size=16,
                                             lr=3e-3, bf16=False, eval_every=0, save_every=20, progress=False))
    after = greedy()
    assert oracle > 0.5 and before < 0.6 * oracle and after > 0.9 * oracle, (before, after, oracle)
    assert set(result.eval) == {1, -1, 0}  # greedy, random and lexical selections of the held-out rows
    from refrag.learned_policy import load_policy
    from refrag.policy import make_policy

    model.policy_network = load_policy(result.final_dir / "policy")  # the query-conditioned kind round-trips
    assert model.policy_network.config.query
    ex = held_out[0]
    policy = make_policy("learned", model=model)
    enc = model.encode_chunks(ex.chunks)
    assert policy.scores(ex.chunks, enc, ex.question) != policy.scores(ex.chunks, enc, "where is the comet?")
    with pytest.raises(InputError, match="question"):
        policy.scores(ex.chunks, enc, None)


def test_a_lexical_prior_starts_the_network_as_the_lexical_policy_and_its_weight_gets_gradients(tmp_path):
    from refrag.config import CompressionOptions
    from refrag.learned_policy import load_policy, query_inputs, save_policy
    from refrag.policy import choose_expanded, make_policy
    from refrag.train.sft import SFTOptions, sft_examples

    torch.manual_seed(0)
    model = tiny_refrag("llama", k=8)
    options = PolicyOptions(task="qa", fraction=0.1, hidden=32, layers=1, lexical_prior=5.0)
    prepare(model, options)
    rows = sft_examples(model, keyword_rows(24, 3), SFTOptions(expand_share=0.0))
    learned, lexical = make_policy("learned", model=model), CompressionOptions(mode="refrag", policy="lexical",
                                                                             expand_fraction=0.1)
    same = 0
    for ex in rows:
        enc = model.encode_chunks(ex.chunks)
        mine = choose_expanded(ex.chunks, replace(lexical, policy="learned"), encodings=enc, question=ex.question,
                               policy=learned).expanded
        same += set(mine) == set(choose_expanded(ex.chunks, lexical, question=ex.question).expanded)
    assert same == len(rows)  # untrained, it picks what BM25 picks
    network = model.policy_network
    ex = next(ex for ex in rows if any(ex.question.split()[-1][:-1] in c.text for c in ex.chunks))
    enc = model.encode_chunks(ex.chunks).float()
    logits = network.score(enc, query_inputs(model.encode_chunks, ex.chunks, enc, ex.question))
    logits.max().backward()
    assert network.prior.requires_grad and float(network.prior.grad) > 0  # the prior's weight can learn
    save_policy(network, tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert loaded.config.lexical_prior == 5.0 and float(loaded.prior) == float(network.prior.detach())
    with pytest.raises(InputError, match="query-conditioned"):
        PolicyOptions(task="perplexity", lexical_prior=1.0)
    with pytest.raises(InputError, match="lexical-prior"):
        PolicyOptions(task="qa", lexical_prior=-1.0)
    with pytest.raises(InputError, match="already has a policy"):  # --init with a policy: the option is refused
        prepare(model, replace(options, lexical_prior=2.0))


def test_query_options_are_checked_and_a_policy_keeps_its_kind(tmp_path):
    with pytest.raises(InputError, match="--task qa"):
        PolicyOptions(task="perplexity", query=True)
    with pytest.raises(InputError, match="task"):
        PolicyOptions(task="translation")
    assert not PolicyOptions(task="qa", query=False).query_conditioned and not PolicyOptions().query_conditioned
    model = tiny_refrag("llama", k=4)
    prepare(model, PolicyOptions(hidden=16, layers=1))
    with pytest.raises(InputError, match="question-blind"):
        prepare(model, PolicyOptions(task="qa", hidden=16, layers=1))


def test_qa_rows_without_a_choice_to_make_are_counted_out_before_training(tmp_path):
    from refrag.train.policy import train_qa_policy
    from refrag.train.qa_data import QAItem

    model = tiny_refrag("llama", k=8)
    one_chunk = [QAItem("where is it?", "here", "here", ("it is here",), 0, "t") for _ in range(10)]
    with pytest.raises(InputError, match="0 usable rows of 10"):
        train_qa_policy(model, one_chunk, PolicyOptions(task="qa", hidden=16, layers=1, eval_examples=2),
                        TrainOptions(tmp_path / "run", steps=2, batch_size=2, bf16=False, progress=False))
    assert not (tmp_path / "run").exists()
