"""TTFT / TTIT / throughput / KV-cache bytes: full context vs REFRAG, same decoder, same process.

For each context length s the three paths run interleaved (full, refrag with precomputed chunk vectors,
refrag encoding chunks at query time), so machine noise hits them alike; medians are reported as ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from refrag.bench.machine import machine_info, peak_rss_bytes, rss_bytes
from refrag.bench.plots import save_figure
from refrag.chunking import make_passage
from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import InputError
from refrag.generation import Answer, Request, generate
from refrag.modeling import RefragModel
from refrag.quantize import weight_bytes

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8000)
QUESTION = "What did the narrator decide to do?"
# Public-domain text (Moby-Dick, ch. 1), repeated to the context length asked for.
SAMPLE_TEXT = (
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever "
    "I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever "
    "I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral "
    "I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral "
    "principle to prevent me from deliberately stepping into the street, and methodically knocking people's "
    "hats off - then, I account it high time to get to sea as soon as I can. This is my substitute for pistol "
    "and ball. With a philosophical flourish Cato throws himself upon his sword; I quietly take to the ship. "
)


@dataclass(frozen=True)
class TTFTRow:
    s: int  # context tokens
    ttft_full_s: float
    ttft_cached_s: float  # refrag, chunk encoder outputs precomputed (an index)
    ttft_uncached_s: float  # refrag, chunks encoded at query time
    ratio_cached: float  # full / cached
    ratio_uncached: float
    encode_s: float  # median chunk-encoding time inside the uncached TTFT
    policy_s: float  # median expansion-policy time inside the cached TTFT (0 without expansion)
    ttit_full_s: float
    ttit_refrag_s: float
    positions_full: int
    positions_refrag: int
    kv_bytes_full: int
    kv_bytes_refrag: int
    samples_s: dict[str, list[float]]  # every timed TTFT per path, in run order (how noisy the machine was)


@dataclass(frozen=True)
class ThroughputRow:
    s: int
    batch: int
    new_tokens: int
    tokens_per_s_full: float
    tokens_per_s_refrag: float
    ratio: float


@dataclass
class TTFTReport:
    machine: dict
    model: str
    k: int
    dtype: str
    repeats: int
    expansion: str  # refrag's raw chunks: "none", or the policy and its budget
    rows: list[TTFTRow] = field(default_factory=list)
    throughput: ThroughputRow | None = None
    quantize: str | None = None  # the decoder's weight quantization (refrag.quantize), None: as loaded
    decoder_weight_bytes: int = 0  # the decoder's parameters + buffers (+ its merged copy for compressed inputs)
    peak_rss_bytes: int = 0  # the process's peak resident memory (includes loading, before any quantization)
    rss_bytes: int = 0  # resident memory at the end of the run (what a quantized decoder saves shows here)

    def to_json(self) -> dict:
        return asdict(self)


def context_request(model: RefragModel, s: int, passage_tokens: int = 256, text: str = SAMPLE_TEXT) -> Request:
    """A request with exactly s context tokens, as passages of passage_tokens (like an index returns)."""
    if s <= 0:
        raise InputError(f"context length must be positive (got {s}).")
    unit = model.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
    ids = (unit * (s // len(unit) + 1))[:s]
    passages = tuple(
        make_passage(ids[i : i + passage_tokens], model.tokenizer, model.k) for i in range(0, s, passage_tokens)
    )
    return Request(question=QUESTION, passages=passages)


def _run(model: RefragModel, requests: Sequence[Request], compression: CompressionOptions, new_tokens: int) -> Answer:
    return generate(model, requests, compression=compression,
                    sampling=SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True))[0]


def _expansion(options: CompressionOptions) -> str:
    if options.policy == "none" or not (options.expand_fraction or options.expand_tokens):
        return "none"
    budget = f"{options.expand_tokens} positions" if options.expand_tokens else f"{options.expand_fraction:.0%}"
    return f"{options.policy} {budget}"


def bench_ttft(
    model: RefragModel,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    *,
    repeats: int = 3,
    ttit_tokens: int = 16,  # tokens generated per timed run (TTFT at the first, TTIT over the rest)
    throughput_batch: int = 8,
    throughput_s: int = 2048,
    compression: CompressionOptions = CompressionOptions(),
    progress: bool = True,
) -> TTFTReport:
    """Measure every s in ``lengths``; then throughput at ``throughput_batch`` x ``throughput_s`` tokens.
    ``compression``: refrag's expansion policy and budget (the full path reads every chunk as tokens)."""
    from tqdm.auto import tqdm

    full, refrag = CompressionOptions(mode="full"), replace(compression, mode="refrag")
    report = TTFTReport(machine_info(), model.config.decoder, model.k, str(model.dtype).replace("torch.", ""), repeats,
                        _expansion(refrag), quantize=model.config.quantize,
                        decoder_weight_bytes=sum(weight_bytes(d) for d in (model.decoder, model.merged_decoder)
                                                 if d is not None))
    warm = context_request(model, min(lengths))
    for options in (full, refrag):
        _run(model, [warm], options, 2)
    bar = tqdm(total=len(lengths) * repeats * 3, desc="bench ttft", disable=not progress)
    for s in lengths:
        plain = context_request(model, s)
        cached = plain.with_encodings(model)
        runs: dict[str, list[Answer]] = {"full": [], "cached": [], "uncached": []}
        for _ in range(repeats):  # interleaved, so noise hits the three paths alike
            for name, request, options in (("full", plain, full), ("cached", cached, refrag), ("uncached", plain, refrag)):
                runs[name].append(_run(model, [request], options, ttit_tokens))
                bar.update()
        med = {name: statistics.median(a.timings.ttft_s for a in v) for name, v in runs.items()}
        answers = {name: v[0] for name, v in runs.items()}
        report.rows.append(
            TTFTRow(
                s=s,
                ttft_full_s=med["full"],
                ttft_cached_s=med["cached"],
                ttft_uncached_s=med["uncached"],
                ratio_cached=med["full"] / med["cached"],
                ratio_uncached=med["full"] / med["uncached"],
                encode_s=statistics.median(a.timings.encode_s for a in runs["uncached"]),
                policy_s=statistics.median(a.timings.policy_s for a in runs["cached"]),
                ttit_full_s=statistics.median(a.timings.ttit_s for a in runs["full"]),
                ttit_refrag_s=statistics.median(a.timings.ttit_s for a in runs["cached"]),
                positions_full=answers["full"].decoder_positions,
                positions_refrag=answers["cached"].decoder_positions,
                kv_bytes_full=answers["full"].kv_cache_bytes,
                kv_bytes_refrag=answers["cached"].kv_cache_bytes,
                samples_s={name: [a.timings.ttft_s for a in v] for name, v in runs.items()},
            )
        )
    bar.close()
    if throughput_batch > 0:
        report.throughput = bench_throughput(model, throughput_s, throughput_batch, ttit_tokens, refrag)
    report.peak_rss_bytes, report.rss_bytes = peak_rss_bytes(), rss_bytes()
    return report


def bench_throughput(model: RefragModel, s: int, batch: int, new_tokens: int,
                     compression: CompressionOptions = CompressionOptions()) -> ThroughputRow:
    """Generated tokens per second for a batch of questions (whole call: prefill + decode)."""
    plain = context_request(model, s)
    cached = plain.with_encodings(model)
    tps = {}
    for mode, request in (("full", plain), ("refrag", cached)):
        answer = _run(model, [request] * batch, replace(compression, mode=mode), new_tokens)  # type: ignore[arg-type]
        tps[mode] = batch * len(answer.token_ids) / answer.timings.total_s
    return ThroughputRow(s, batch, new_tokens, tps["full"], tps["refrag"], tps["refrag"] / tps["full"])


def plot_ttft(report: TTFTReport, path: str | Path) -> Path:
    """PNG: TTFT (log scale) vs context length for the three paths, with the ratios annotated."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r.s for r in report.rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(s, [r.ttft_full_s for r in report.rows], "o-", label="full context")
    ax.plot(s, [r.ttft_uncached_s for r in report.rows], "s-", label=f"REFRAG{report.k} (encode at query time)")
    ax.plot(s, [r.ttft_cached_s for r in report.rows], "^-", label=f"REFRAG{report.k} (precomputed chunks)")
    for r in report.rows:
        ax.annotate(f"{r.ratio_cached:.1f}x", (r.s, r.ttft_cached_s), textcoords="offset points", xytext=(0, -14),
                    ha="center", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="context tokens s", ylabel="time to first token (s)",
           title=f"TTFT, {Path(report.model).name}, {report.dtype}, {report.machine.get('torch_threads')} threads")
    ax.set_xticks(s, [str(x) for x in s])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(y=0.15)
    return save_figure(fig, ax, path)
