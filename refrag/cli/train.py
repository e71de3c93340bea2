"""`refrag train reconstruct|cpt|mixed` (the paper's stages, in order) and `refrag eval reconstruction`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import DEFAULTS, Decoder, DType, Encoder, Json, K, print_json, setup_torch

app = typer.Typer(no_args_is_help=True, help="Train the compressor: reconstruct -> cpt -> mixed.")

TRAINING_DATA = ("../shared/data/wiki_vital_summaries_en.jsonl,../shared/data/sotu.txt,"
                 "../shared/data/moby_dick.txt")

Data = Annotated[list[str], typer.Option("--data", help="training text: .txt/.jsonl files, folders, hf:NAME[:CONFIG]"
                                        " (repeat or comma-separate)")]
Out = Annotated[Path, typer.Option("--out", "-o", help="output folder (checkpoint/, final/, metrics.csv)")]
Init = Annotated[str | None, typer.Option(help="checkpoint of the previous stage to start from")]
Steps = Annotated[int, typer.Option(help="optimizer steps")]
Batch = Annotated[int, typer.Option(help="examples per optimizer step")]
Micro = Annotated[int, typer.Option(help="examples per forward/backward (gradient accumulation)")]
LR = Annotated[float | None, typer.Option(help="peak learning rate (default: the paper's for the stage)")]
MaxChunks = Annotated[int, typer.Option(help="longest context in chunks (s = max_chunks * k)")]
Curriculum = Annotated[bool, typer.Option(help="Table 8 curriculum (--no-curriculum: the paper's ablation)")]
Cont = Annotated[int, typer.Option(help="o: continuation tokens to predict")]
Expand = Annotated[float, typer.Option(help="p: fraction of chunks left uncompressed at random")]
Distill = Annotated[float, typer.Option(help="weight in [0, 1] of a KL loss towards the original decoder reading the "
                                             "full context as tokens (not in the paper; 0: next-token loss only)")]
TrainDecoder = Annotated[str, typer.Option(help="frozen, full (all decoder parameters train) or lora (a LoRA adapter "
                                                "of the decoder trains; it applies to compressed inputs only)")]
TrainEncoder = Annotated[bool, typer.Option(help="train the encoder (--no-train-encoder: it stays as the previous "
                                                 "stage left it; the projector still trains)")]
LoraRank = Annotated[int, typer.Option(help="rank of the decoder's LoRA adapter (--train-decoder lora)")]
MaxTokens = Annotated[int, typer.Option(help="tokens read per data source")]
Seed = Annotated[int, typer.Option(help="seed: data order, windows, held-out set")]
EvalEvery = Annotated[int, typer.Option(help="steps between held-out evaluations")]
SaveEvery = Annotated[int, typer.Option(help="steps between checkpoints")]
Resume = Annotated[bool, typer.Option(help="continue exactly from OUT/checkpoint")]
GradCkpt = Annotated[bool, typer.Option(help="gradient checkpointing (less memory, ~30% slower)")]
BF16 = Annotated[bool, typer.Option(help="bf16 autocast over fp32 master weights")]
StopAfter = Annotated[int | None, typer.Option(help="stop (with a checkpoint) after this many steps; the schedule "
                                                    "still spans --steps (time boxes, same-step ablations)")]

PAPER_LR = {"reconstruct": 2e-4, "cpt": 5e-5, "mixed": 5e-5}


def _run(stage: str, *, data: list[str], out: Path, init: str | None, decoder: str, encoder: str, k: int,
         steps: int, batch_size: int, micro_batch_size: int, lr: float | None, max_chunks: int, curriculum: bool,
         continuation_tokens: int, expand_fraction: float, train_decoder: str, max_tokens: int, seed: int,
         lora_rank: int = 8, distill: float = 0.0, train_encoder: bool = True,
         eval_every: int, save_every: int, resume: bool, gradient_checkpointing: bool, bf16: bool,
         stop_after: int | None = None) -> None:
    """One stage from the CLI: each command passes its own options (``**locals()``) plus the ones it fixes."""
    setup_torch()

    from refrag.train.common import StageOptions, load_for_stage
    from refrag.train.cpt import cpt
    from refrag.train.data import DataOptions, TokenCorpus, read_sources
    from refrag.train.loop import TrainOptions
    from refrag.train.mixed import mixed
    from refrag.train.reconstruct import reconstruct

    stage_options = StageOptions(max_chunks=max_chunks, curriculum=curriculum, continuation_tokens=continuation_tokens,
                                 expand_fraction=expand_fraction, train_decoder=train_decoder, seed=seed,  # type: ignore[arg-type]
                                 lora_rank=lora_rank, distill=distill, train_encoder=train_encoder)
    train_options = TrainOptions(out_dir=out, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                 lr=lr or PAPER_LR[stage], eval_every=eval_every, save_every=save_every,
                                 resume=resume, gradient_checkpointing=gradient_checkpointing, bf16=bf16,
                                 stop_after=stop_after)
    model = load_for_stage(stage, init, decoder=decoder, encoder=encoder, k=k)
    corpus = TokenCorpus.build(DataOptions(sources=read_sources(data), max_tokens_per_source=max_tokens), model.tokenizer)
    typer.echo(f"{stage}: {len(corpus.train):,} training tokens, {len(corpus.val):,} held out", err=True)
    recipe = {"reconstruct": reconstruct, "cpt": cpt, "mixed": mixed}[stage]
    result = recipe(model, corpus, stage_options, train_options)
    for n, s in sorted(result.eval.items()):
        typer.echo(f"held-out {n}x{model.k}: log-ppl {s.log_ppl:.3f}, token accuracy {s.accuracy:.3f} ({s.tokens} tokens)")
    typer.echo(f"final model: {result.final_dir}" if result.final_dir else f"stopped at step {result.steps}")


@app.command("reconstruct")
def reconstruct_cmd(
    out: Out = Path("runs/reconstruct"), data: Data = [TRAINING_DATA], init: Init = None,  # noqa: B006
    decoder: Decoder = DEFAULTS["decoder"], encoder: Encoder = DEFAULTS["encoder"], k: K = 16,
    steps: Steps = 1000, batch_size: Batch = 8, micro_batch_size: Micro = 8, lr: LR = None,
    max_chunks: MaxChunks = 8, curriculum: Curriculum = True, train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = 8, max_tokens: MaxTokens = 2_000_000, seed: Seed = 0,
    eval_every: EvalEvery = 100, save_every: SaveEvery = 100, resume: Resume = False,
    gradient_checkpointing: GradCkpt = False, bf16: BF16 = True, stop_after: StopAfter = None,
) -> None:
    """Stage 1: encoder + projector (+ a decoder LoRA with --train-decoder lora; the paper: frozen) learn to
    reconstruct each context from its chunk vectors."""
    _run("reconstruct", **locals(), continuation_tokens=0, expand_fraction=0.0)


@app.command("cpt")
def cpt_cmd(
    init: Annotated[str, typer.Option(help="output of `refrag train reconstruct` (its final/ folder)")],
    out: Out = Path("runs/cpt"), data: Data = [TRAINING_DATA],  # noqa: B006
    steps: Steps = 1000, batch_size: Batch = 8, micro_batch_size: Micro = 4, lr: LR = None,
    max_chunks: MaxChunks = 32, curriculum: Curriculum = True, continuation_tokens: Cont = 128,
    distill: Distill = 0.0, train_encoder: TrainEncoder = True, train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = 8, max_tokens: MaxTokens = 2_000_000, seed: Seed = 0,
    eval_every: EvalEvery = 100, save_every: SaveEvery = 100, resume: Resume = False,
    gradient_checkpointing: GradCkpt = False, bf16: BF16 = True, stop_after: StopAfter = None,
) -> None:
    """Stage 2: next-paragraph prediction from compressed context (needs a reconstruct checkpoint)."""
    _run("cpt", **locals(), decoder="", encoder="", k=0, expand_fraction=0.0)


@app.command("mixed")
def mixed_cmd(
    init: Annotated[str, typer.Option(help="output of `refrag train cpt` (its final/ folder)")],
    out: Out = Path("runs/mixed"), data: Data = [TRAINING_DATA],  # noqa: B006
    steps: Steps = 500, batch_size: Batch = 8, micro_batch_size: Micro = 4, lr: LR = None,
    max_chunks: MaxChunks = 32, continuation_tokens: Cont = 128, expand_fraction: Expand = 0.1,
    distill: Distill = 0.0, train_encoder: TrainEncoder = True, train_decoder: TrainDecoder = "frozen",
    lora_rank: LoraRank = 8, max_tokens: MaxTokens = 2_000_000, seed: Seed = 0,
    eval_every: EvalEvery = 100, save_every: SaveEvery = 100, resume: Resume = False,
    gradient_checkpointing: GradCkpt = False, bf16: BF16 = True, stop_after: StopAfter = None,
) -> None:
    """Stage 3: CPT with a fraction of chunks left uncompressed at random (needs a cpt checkpoint)."""
    _run("mixed", **locals(), decoder="", encoder="", k=0, curriculum=False)


HELD_OUT = "../shared/data/wiki_paragraph_segmentation_en.txt"


def eval_reconstruction_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="refrag checkpoint (default: the shipped one)")] = None,
    decoder: Decoder = DEFAULTS["decoder"], encoder: Encoder = DEFAULTS["encoder"], k: K = 16,
    dtype: DType = "bfloat16",
    data: Annotated[str, typer.Option(help="held-out text (.txt/.jsonl) the compressor never trained on")] = HELD_OUT,
    max_chunks: MaxChunks = 8,
    examples: Annotated[int, typer.Option(help="examples per number of chunks")] = 32,
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Reconstruction quality by number of chunks: token accuracy and log-perplexity (`refrag eval reconstruction`)."""
    setup_torch()
    from rich.console import Console
    from rich.table import Table

    from refrag.eval.reconstruction import eval_reconstruction
    from refrag.loading import load_model

    m = load_model(model, decoder=decoder, encoder=encoder, k=k, dtype=dtype, progress=not json_out)
    report = eval_reconstruction(m, data, max_chunks=max_chunks, examples=examples, seed=seed, progress=not json_out)
    if json_out:
        print_json(report.to_json())
        return
    table = Table(title=f"reconstruction, k={report.k}, {report.examples} held-out examples per row ({data})")
    for col in ("chunks", "tokens", "log-ppl", "token accuracy"):
        table.add_column(col, justify="right")
    for r in report.rows:
        table.add_row(f"{r.chunks}x{report.k}", str(r.tokens), f"{r.log_ppl:.3f}", f"{r.accuracy:.3f}")
    Console().print(table)


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="a trained checkpoint (e.g. runs/reconstruct/final)")],
    target: Annotated[Path, typer.Argument(help="where to write the bf16 copy (e.g. refrag/checkpoints/NAME)")],
) -> None:
    """Write a compact bf16 copy of a trained checkpoint (what ships under refrag/checkpoints/)."""
    setup_torch()
    from refrag.train.checkpoint import export_model

    typer.echo(f"exported: {export_model(source, target)}")
