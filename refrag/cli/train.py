"""`refrag train reconstruct|cpt|mixed|export`: the paper's stages, in order.

Each command builds the typed options of its stage (``StageOptions``) from its own flags; the flags every stage
shares are option groups declared once (data, optimisation), and the stage's facts (what it starts from, the
paper's learning rate) live with its recipe in ``refrag/train/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from refrag.cli.common import (
    ModelChoice,
    Threads,
    apply_threads,
    flag,
    model_options,
    option_group,
    setup_torch,
)

if TYPE_CHECKING:
    from refrag.config import RefragConfig

app = typer.Typer(no_args_is_help=True, help="Train the compressor: reconstruct -> cpt -> mixed (-> policy, sft).")

TRAINING_DATA = ("../shared/data/wiki_vital_summaries_en.jsonl,../shared/data/sotu.txt,"
                 "../shared/data/moby_dick.txt")

Init = Annotated[str, typer.Option(help="checkpoint of the previous stage to start from (its final/ folder)")]
MaxChunks = Annotated[int, typer.Option(help="longest context in chunks (s = max_chunks * k)")]
Curriculum = Annotated[bool, typer.Option(help="Table 8 curriculum (--no-curriculum: the paper's ablation)")]
Cont = Annotated[int, typer.Option(help="o: continuation tokens to predict")]
Expand = Annotated[float, typer.Option(help="p: fraction of chunks left uncompressed at random")]
Distill = Annotated[float, typer.Option(help="weight in [0, 1] of a KL loss towards the original decoder reading the "
                                             "full context as tokens (not in the paper; 0: next-token loss only)")]
DistillHidden = Annotated[float, typer.Option(
    help="weight (>= 0) of a loss on every decoder layer's hidden states at the continuation: their relative "
         "distance from the original decoder's reading the full context as tokens (not in the paper; 0: off)")]
TrainDecoder = Annotated[str, typer.Option(help="frozen, full (all decoder parameters train) or lora (a LoRA adapter "
                                                "of the decoder trains; it applies to compressed inputs only)")]
TrainEncoder = Annotated[bool, typer.Option(help="train the encoder (--no-train-encoder: it stays as the previous "
                                                 "stage left it; the projector still trains)")]
LoraRank = Annotated[int | None, typer.Option(
    help="rank of the decoder's LoRA adapter (--train-decoder lora): a new one's (default 8), or, with an --init "
         "that has one, a larger rank widens it (new directions start at zero; default: keep its rank)",
    show_default=False)]
Scope = Annotated[str | None, typer.Option(
    help="where the decoder's adapter applies in compressed inputs: sequence (every position) or chunks (the "
         "chunk vectors only: text positions stay the original decoder's; default: as --init has it, else "
         "sequence)", show_default=False)]
Seed = Annotated[int, typer.Option(help="seed: data order, windows, held-out set")]


def _data_group():
    """--data / --max-tokens -> DataOptions."""
    def build(data: list[str], max_tokens: int):
        from refrag.train.data import DataOptions, read_sources

        return DataOptions(sources=read_sources(data), max_tokens_per_source=max_tokens)

    return option_group("data", build, (
        flag("data", Annotated[list[str], typer.Option(
            "--data", help="training text: .txt/.jsonl files, folders, hf:NAME[:CONFIG] (repeat or comma-separate)")],
            [TRAINING_DATA]),
        flag("max_tokens", Annotated[int, typer.Option(help="tokens read per data source")], 2_000_000),
    ))


def _loop_group(out: str, steps: int, micro_batch_size: int):
    """The shared loop's flags -> TrainOptions (per-stage defaults for the output folder, steps, micro-batch);
    ``--threads`` is applied as the flags are read, before any model loads."""
    def build(**values: Any):
        from refrag.train.loop import TrainOptions

        apply_threads(values.pop("threads"))
        return TrainOptions(out_dir=values.pop("out"), **values)

    opt = typer.Option
    return option_group("loop", build, (
        flag("out", Annotated[Path, opt("--out", "-o", help="output folder (checkpoint/, final/, metrics.csv)")],
                Path(out)),
        flag("steps", Annotated[int, opt(help="optimizer steps")], steps),
        flag("batch_size", Annotated[int, opt(help="examples per optimizer step")], 8),
        flag("micro_batch_size", Annotated[int, opt(help="examples per forward/backward (gradient accumulation)")],
                micro_batch_size),
        flag("lr", Annotated[float | None, opt(help="peak learning rate (default: the paper's for the stage)")],
                None),
        flag("eval_every", Annotated[int, opt(help="steps between held-out evaluations")], 100),
        flag("save_every", Annotated[int, opt(help="steps between checkpoints")], 100),
        flag("resume", Annotated[bool, opt(help="continue exactly from OUT/checkpoint")], False),
        flag("gradient_checkpointing", Annotated[bool, opt(help="gradient checkpointing (less memory, ~30% "
                                                                   "slower)")], False),
        flag("bf16", Annotated[bool | None, opt(help="bf16 autocast over fp32 master weights (default: where the "
                                                    "CPU / GPU has native bf16 matmuls, e.g. AVX512-BF16 or "
                                                    "AMX; else fp32)", show_default=False)], None),
        flag("stop_after", Annotated[int | None, opt(help="stop (with a checkpoint) after this many steps; the "
                                                             "schedule still spans --steps (time boxes, ablations)")],
                None),
        flag("max_minutes", Annotated[float | None, opt(help="stop (with a checkpoint) after this many minutes of "
                                                              "this run (equal-budget comparisons, time boxes)")],
             None),
        flag("threads", Threads, None),
    ))


def _encoder_group():
    """How a fresh compressor's chunk encoder is made (stage 1 without --init) -> RefragConfig fields."""
    def build(pooling: str, encoder_layers: int, encoder_lora_rank: int) -> dict[str, Any]:
        return {"pooling": pooling, "encoder_layers": encoder_layers, "encoder_lora_rank": encoder_lora_rank}

    opt = typer.Option
    return option_group("encoder_settings", build, (
        flag("pooling", Annotated[str, opt(help="chunk pooling: mean or cls (text encoders); mean, last or memory "
                                               "(--encoder self)")], "mean"),
        flag("encoder_layers", Annotated[int, opt(help="--encoder self: how many of the decoder's first layers "
                                                      "read the chunk")], 8),
        flag("encoder_lora_rank", Annotated[int, opt(help="--encoder self: rank of the LoRA adapter on those "
                                                         "layers")], 32),
    ))


def _run(stage: str, init: str | None, fresh: RefragConfig | None, data, stage_options, loop) -> None:
    """Load the stage's models (checking the order), read the corpus, run the recipe, print the held-out scores."""
    setup_torch()
    from refrag.train import cpt, mixed, reconstruct
    from refrag.train.common import load_for_stage
    from refrag.train.data import TokenCorpus

    module = {"reconstruct": reconstruct, "cpt": cpt, "mixed": mixed}[stage]
    model = load_for_stage(module.RECIPE, init, fresh)
    corpus = TokenCorpus.build(data, model.tokenizer)
    typer.echo(f"{stage}: {len(corpus.train):,} training tokens, {len(corpus.val):,} held out", err=True)
    result = getattr(module, stage)(model, corpus, stage_options, loop)
    for n, s in sorted(result.eval.items()):
        typer.echo(f"held-out {n}x{model.k}: log-ppl {s.log_ppl:.3f}, token accuracy {s.accuracy:.3f} ({s.tokens} tokens)")
    typer.echo(f"final model: {result.final_dir}" if result.final_dir else f"stopped at step {result.steps}")


@app.command("reconstruct")
@model_options(checkpoint=False, dtype=False, threads=False)
@_encoder_group()
@_data_group()
@_loop_group("runs/reconstruct", steps=1000, micro_batch_size=8)
def reconstruct_cmd(
    init: Annotated[str | None, typer.Option(help="a reconstruct checkpoint to continue from")] = None,
    max_chunks: MaxChunks = 8, curriculum: Curriculum = True, train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = None, adapter_scope: Scope = None, seed: Seed = 0, *, choice: ModelChoice,
    encoder_settings: dict[str, Any], data, loop,
) -> None:
    """Stage 1: encoder + projector (+ a decoder LoRA with --train-decoder lora; the paper: frozen) learn to
    reconstruct each context from its chunk vectors. Without --init the compressor is new: --encoder picks its
    chunk encoder (a text encoder such as all-minilm-l6-v2 or mpnet, `self`: the decoder's first layers + LoRA,
    or `tokens`: the decoder's token embeddings + a small mixer; default `self`, the shipped compressor's, which
    was trained with --pooling memory: docs/training.md has its commands)."""
    from refrag.config import RefragConfig
    from refrag.train.common import StageOptions

    stage = StageOptions(max_chunks=max_chunks, curriculum=curriculum, train_decoder=train_decoder,  # type: ignore[arg-type]
                         lora_rank=lora_rank, adapter_scope=adapter_scope, seed=seed)  # type: ignore[arg-type]
    from refrag.errors import InputError

    parts = {"decoder": choice.decoder, "encoder": choice.encoder, "k": choice.k,
             "decoder_adapter": choice.decoder_adapter}
    if init is not None and choice.decoder_adapter is not None:
        raise InputError("--decoder-adapter makes a new compressor for the adapted decoder; with --init the "
                         "checkpoint's own decoder (and adapter) are used. Drop one of the two.")
    fresh = RefragConfig(**{n: v for n, v in parts.items() if v is not None}, **encoder_settings)
    _run("reconstruct", init, fresh, data, stage, loop)


@app.command("cpt")
@_data_group()
@_loop_group("runs/cpt", steps=1000, micro_batch_size=4)
def cpt_cmd(
    init: Init, max_chunks: MaxChunks = 32, curriculum: Curriculum = True, continuation_tokens: Cont = 128,
    distill: Distill = 0.0, distill_hidden: DistillHidden = 0.0, train_encoder: TrainEncoder = True,
    train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = None, adapter_scope: Scope = None, seed: Seed = 0, *, data, loop,
) -> None:
    """Stage 2: next-paragraph prediction from compressed context (needs a reconstruct checkpoint)."""
    from refrag.train.common import StageOptions

    stage = StageOptions(max_chunks=max_chunks, curriculum=curriculum, continuation_tokens=continuation_tokens,
                         distill=distill, distill_hidden=distill_hidden, train_decoder=train_decoder,  # type: ignore[arg-type]
                         train_encoder=train_encoder, lora_rank=lora_rank, adapter_scope=adapter_scope, seed=seed)  # type: ignore[arg-type]
    _run("cpt", init, None, data, stage, loop)


@app.command("mixed")
@_data_group()
@_loop_group("runs/mixed", steps=500, micro_batch_size=4)
def mixed_cmd(
    init: Init, max_chunks: MaxChunks = 32, continuation_tokens: Cont = 128, expand_fraction: Expand = 0.1,
    distill: Distill = 0.0, distill_hidden: DistillHidden = 0.0, train_encoder: TrainEncoder = True,
    train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = None, adapter_scope: Scope = None, seed: Seed = 0, *, data, loop,
) -> None:
    """Stage 3: CPT with a fraction of chunks left uncompressed at random (needs a cpt checkpoint)."""
    from refrag.train.common import StageOptions

    stage = StageOptions(max_chunks=max_chunks, curriculum=False, continuation_tokens=continuation_tokens,
                         expand_fraction=expand_fraction, distill=distill, distill_hidden=distill_hidden,
                         train_decoder=train_decoder,  # type: ignore[arg-type]
                         train_encoder=train_encoder, lora_rank=lora_rank, adapter_scope=adapter_scope,  # type: ignore[arg-type]
                         seed=seed)
    _run("mixed", init, None, data, stage, loop)


@app.command("policy")
@_data_group()
@_loop_group("runs/policy", steps=200, micro_batch_size=8)
def policy_cmd(
    init: Init,
    task: Annotated[str, typer.Option(help="reward: perplexity (minus the continuation's log-ppl, the paper's; "
                                           "trains on --data text) or qa (minus the answer's NLL in the RAG "
                                           "prompt; trains on --qa-data rows)")] = "perplexity",
    qa_data: Annotated[Path | None, typer.Option(help="--task qa: rows from `refrag data qa` (the last "
                                                      "--eval-examples are held out)")] = None,
    query: Annotated[bool | None, typer.Option(help="a query-conditioned network (it also reads the question's "
                                                    "encoding and each chunk's cosine / BM25 for it; default: on "
                                                    "for --task qa)", show_default=False)] = None,
    target: Annotated[str, typer.Option(help="--task qa: the answer scored: teacher (the full-context decoder's) "
                                             "or gold (the row's)")] = "teacher",
    expand_fraction: Annotated[float, typer.Option(help="p: the policy keeps T' = round(p L) chunks raw")] = 0.25,
    context_chunks: Annotated[int, typer.Option(help="--task perplexity: L context chunks per example (s = L k)")]
        = 32,
    continuation_tokens: Cont = 128,
    group: Annotated[int, typer.Option(help="G: selections sampled per example (GRPO group)")] = 4,
    reuse: Annotated[int, typer.Option(help="optimizer steps per batch of rollouts (PPO epochs)")] = 2,
    clip: Annotated[float, typer.Option(help="PPO ratio clip")] = 0.2,
    hidden: Annotated[int, typer.Option(help="width of a new policy network")] = 256,
    layers: Annotated[int, typer.Option(help="transformer layers of a new policy network (paper: 2)")] = 2,
    lexical_prior: Annotated[float, typer.Option(help="a new query-conditioned network starts ranking chunks as "
                                                      "--policy lexical: the BM25 feature's initial weight in "
                                                      "each logit (0: start as random)")] = 0.0,
    eval_examples: Annotated[int, typer.Option(help="held-out examples scored at each evaluation")] = 16,
    seed: Seed = 0,
    *, data, loop,
) -> None:
    """The selective-expansion policy (paper Appendix A.1): a small transformer over the chunk vectors, trained by
    GRPO with the compressor frozen; it ships inside the output checkpoint (`--policy learned`)."""
    setup_torch()
    from refrag.errors import InputError
    from refrag.train.common import load_for_stage
    from refrag.train.data import TokenCorpus
    from refrag.train.policy import EVAL_NAMES, RECIPE, PolicyOptions, train_policy, train_qa_policy
    from refrag.train.qa_data import read_items

    options = PolicyOptions(task=task, query=query, fraction=expand_fraction, context_chunks=context_chunks,  # type: ignore[arg-type]
                            continuation_tokens=continuation_tokens, target=target, group=group, reuse=reuse,  # type: ignore[arg-type]
                            clip=clip, hidden=hidden, layers=layers, lexical_prior=lexical_prior,
                            eval_examples=eval_examples, seed=seed)
    if (qa_data is None) == (task == "qa"):
        raise InputError("--task qa trains on --qa-data (rows from `refrag data qa`); --qa-data is only for "
                         "--task qa.")
    items = read_items(qa_data) if qa_data is not None else None
    model = load_for_stage(RECIPE, init)
    if items is not None:
        typer.echo(f"policy (qa): {len(items) - eval_examples} training rows, {eval_examples} held out", err=True)
        result = train_qa_policy(model, items, options, loop)
    else:
        corpus = TokenCorpus.build(data, model.tokenizer)
        typer.echo(f"policy: {len(corpus.train):,} training tokens, {len(corpus.val):,} held out", err=True)
        result = train_policy(model, corpus, options, loop)
    scored = "answer" if items is not None else "continuation"
    for key, s in sorted(result.eval.items(), reverse=True):
        typer.echo(f"held-out {scored}, {EVAL_NAMES[key]} selection of {expand_fraction:.0%}: log-ppl {s.log_ppl:.3f}")
    typer.echo(f"final model: {result.final_dir}" if result.final_dir else f"stopped at step {result.steps}")


@app.command("sft")
@_loop_group("runs/sft", steps=300, micro_batch_size=8)
def sft_cmd(
    data: Annotated[Path, typer.Option(help="QA rows from `refrag data qa` (the last --eval-examples are held out)")],
    init: Annotated[str | None, typer.Option(help="checkpoint of the previous stage to start from (its final/ "
                                                  "folder); none with --read text")] = None,
    target: Annotated[str, typer.Option(help="teacher: the full-context decoder's answer (sequence-level "
                                             "distillation); gold: the row's answer")] = "teacher",
    distill: Annotated[float, typer.Option(help="weight in [0, 1] of a token-level KL to the full-context decoder")]
        = 0.0,
    policy: Annotated[str, typer.Option(help="chunks kept raw while training: none, first, last, random, lexical")]
        = "lexical",
    expand_fraction: Annotated[float, typer.Option(help="p: fraction of the chunks the policy keeps raw")] = 0.1,
    expand_share: Annotated[float, typer.Option(help="share of the examples trained with expansion (the rest: "
                                                     "every chunk compressed)")] = 0.5,
    eval_examples: Annotated[int, typer.Option(help="last rows of --data held out for evaluation")] = 32,
    read: Annotated[str, typer.Option(help="compressed: train the compressor; text: the fair baseline (LLaMA_FT): "
                                           "a new adapter of the plain decoder on the same rows, every chunk as "
                                           "text (evaluate it with `eval qa --modes full --decoder-adapter "
                                           "OUT/final/decoder_adapter`)")] = "compressed",
    learn: Annotated[str, typer.Option(help="compressor: train the encoder, projector and its decoder adapter; "
                                            "adapter: keep the compressor frozen (its vectors cannot move) and "
                                            "train a new answer adapter beside it on the same input, kept in "
                                            "OUT/final/answer_adapter and used in refrag mode only")] = "compressor",
    replay: Annotated[float, typer.Option(help="share of each batch that is next-paragraph windows of --replay-data "
                                               "(CPT's objective, 16 chunks -> 64 tokens), so answering does not undo "
                                               "what CPT taught; 0: none")] = 0.0,
    replay_data: Annotated[list[str], typer.Option(help="training text of the replay windows (as `train cpt "
                                                        "--data`)")] = [TRAINING_DATA],  # noqa: B006
    lora_rank: Annotated[int, typer.Option(help="rank of the new adapter (--learn adapter, --read text)")] = 32,
    train_encoder: TrainEncoder = True, seed: Seed = 0,
    *, loop,
) -> None:
    """Stage 4: answer questions from compressed context (SFT by distillation from the full-context decoder;
    needs a cpt, mixed or sft checkpoint and `refrag data qa` rows)."""
    setup_torch()
    from refrag import checkpoint
    from refrag.config import RefragConfig
    from refrag.errors import InputError
    from refrag.train.common import load_for_stage
    from refrag.train.data import DataOptions, TokenCorpus, read_sources
    from refrag.train.qa_data import read_items
    from refrag.train.sft import RECIPE, SFTOptions, train_sft

    options = SFTOptions(target=target, distill=distill, policy=policy, expand_fraction=expand_fraction,  # type: ignore[arg-type]
                         expand_share=expand_share, eval_examples=eval_examples, train_encoder=train_encoder,
                         read=read, learn=learn, replay=replay, seed=seed)  # type: ignore[arg-type]
    if options.reads_text and init:
        raise InputError("--read text fine-tunes the plain decoder (a new text adapter): leave out --init.")
    items = read_items(data)
    model = (checkpoint.from_config(RefragConfig(dtype="float32")) if options.reads_text
             else load_for_stage(RECIPE, init))
    typer.echo(f"sft: {len(items) - eval_examples} training rows, {eval_examples} held out", err=True)
    corpus = TokenCorpus.build(DataOptions(read_sources(replay_data)), model.tokenizer) if options.replay else None
    result = train_sft(model, items, options, loop, lora_rank=lora_rank, replay_corpus=corpus)
    for key, s in sorted(result.eval.items()):
        if key == options.replay_chunks and options.replay:
            typer.echo(f"held-out text continuations ({key} chunks compressed): log-ppl {s.log_ppl:.3f}")
            continue
        name = "every chunk as text" if options.reads_text else f"{policy} {expand_fraction:.0%} raw" if key \
            else "all compressed"
        typer.echo(f"held-out answers ({name}): log-ppl {s.log_ppl:.3f}, token accuracy {s.accuracy:.3f}")
    typer.echo(f"final model: {result.final_dir}" if result.final_dir else f"stopped at step {result.steps}")


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="a trained checkpoint (e.g. runs/reconstruct/final)")],
    target: Annotated[Path, typer.Argument(help="where to write the bf16 copy (e.g. refrag/checkpoints/NAME)")],
) -> None:
    """Write a compact bf16 copy of a trained checkpoint (what ships under refrag/checkpoints/)."""
    setup_torch()
    from refrag.checkpoint import export

    typer.echo(f"exported: {export(source, target)}")
