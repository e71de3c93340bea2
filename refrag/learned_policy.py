"""The paper's learned expansion policy (Appendix A.1): a small transformer over the chunk vectors, one logit per
chunk, T' = round(p * L) chunks picked by pointer-masked sequential sampling (greedy at inference), trained by
GRPO (``refrag.train.policy``).

The network reads the chunk ENCODER outputs (what an index stores, so it costs one tiny forward per question),
scaled to unit length, with the chunk's position counted from the start and from the end of the context. (The
unit scale matters: the self-encoder's outputs have norms ~40, and unscaled they drowned the position embeddings
~45 to 1, so GRPO could not learn that the chunks nearest the continuation matter; MiniLM's are unit-norm already.) Like the paper's, the plain
network does not see the question; the query-conditioned one (``PolicyNetConfig.query``, trained with the QA
reward) also reads the question's encoding (same chunk encoder) as an extra token, and two features per chunk:
its cosine with the question's encoding and its BM25 score for the question's terms (scaled by the context's
best), the signals the ``similarity`` and ``lexical`` heuristics rank by; with ``lexical_prior`` w > 0 the scaled
BM25 times a learned weight (w at first) is added to each logit, so the untrained network ranks as ``lexical``
does and RL learns from there instead of from RAND. It ships inside the checkpoint folder
(``policy/``: safetensors weights + a JSON config); a checkpoint with one answers ``--policy learned``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from refrag.chunking import Chunk
from refrag.errors import CheckpointError, InputError
from refrag.io import write_json_atomic
from refrag.policy import Encode, LexicalPolicy, need_question

WEIGHTS, CONFIG = "policy.safetensors", "policy.json"
QUERY_FEATURES = 2  # per chunk: cosine with the question's encoding, BM25 / the context's best BM25
BM25_FEATURE = 1  # its index among them (query_inputs stacks them in that order)


@dataclass(frozen=True)
class PolicyNetConfig:
    input_dim: int  # the chunk encoder's output size
    hidden: int = 256
    layers: int = 2  # the paper: a 2-layer transformer
    heads: int = 4
    max_positions: int = 512  # chunk positions with their own embedding (further ones share the last)
    query: bool = False  # query-conditioned: the question's encoding and per-chunk query features are inputs
    lexical_prior: float = 0.0  # query-conditioned: initial weight of the scaled BM25 feature added to each logit
    unit_inputs: bool = True  # encodings scaled to unit length (files written before this field: False)

    def __post_init__(self) -> None:
        if min(self.input_dim, self.hidden, self.layers, self.heads, self.max_positions) < 1 or self.hidden % self.heads:
            raise InputError(f"bad policy network shape {self}: sizes must be >= 1 and hidden a multiple of heads.")
        if self.lexical_prior and not self.query:
            raise InputError("a lexical prior needs the question's BM25 feature: only a query-conditioned policy has it.")


@dataclass(frozen=True)
class QueryInputs:
    """What a query-conditioned network reads about the question, for one context of L chunks."""

    encoding: torch.Tensor  # [E] the question through the chunk encoder
    features: torch.Tensor  # [L, QUERY_FEATURES]


def query_inputs(encode: Encode, chunks: Sequence[Chunk], encodings: torch.Tensor, question: str | None) -> QueryInputs:
    """The question's encoding and each chunk's (cosine, scaled BM25: the lexical policy's score) for ``chunks``
    and their ``encodings`` [L, E]."""
    query = encode([need_question(question, "learned (query-conditioned)")])[0].float()  # [E]
    cosine = torch.nn.functional.cosine_similarity(encodings.float(), query[None].to(encodings.device), dim=-1)  # [L]
    bm25 = torch.tensor(LexicalPolicy().scores(chunks, encodings, question), dtype=torch.float32,
                        device=encodings.device)  # [L]
    best = bm25.max()
    bm25 = bm25 / best if best > 0 else bm25
    return QueryInputs(query, torch.stack([cosine.float(), bm25], -1))  # [L, QUERY_FEATURES]: BM25 at BM25_FEATURE


class PolicyNetwork(nn.Module):
    """[B, L, E] chunk encodings (+ the question's, for a query-conditioned one) -> [B, L] expansion logits."""

    def __init__(self, config: PolicyNetConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.inp = nn.Linear(config.input_dim, h)
        self.from_start = nn.Embedding(config.max_positions, h)
        self.from_end = nn.Embedding(config.max_positions, h)
        layer = nn.TransformerEncoderLayer(h, config.heads, 4 * h, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Linear(h, 1)
        if config.query:
            self.query_inp = nn.Linear(config.input_dim, h)  # the question as one more token, before the chunks
            self.features = nn.Linear(QUERY_FEATURES, h)
        for table in (self.from_start, self.from_end):  # small: position must not drown the chunk's content
            nn.init.normal_(table.weight, std=0.02)
        nn.init.zeros_(self.head.weight)  # untrained: every chunk equally likely (the RAND baseline) ...
        nn.init.zeros_(self.head.bias)
        if config.lexical_prior:  # ... or, with a prior, ranked by BM25 as `lexical` (a learned scalar from there on)
            self.prior = nn.Parameter(torch.tensor(float(config.lexical_prior)))

    def forward(self, encodings: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """encodings [B, L, E], mask [B, L] (True: a real chunk); a query-conditioned network also takes the
        question's encoding query [B, E] and features [B, L, QUERY_FEATURES] -> logits [B, L] (-inf off the mask)."""
        B, L, _ = encodings.shape
        cap = self.config.max_positions - 1
        start = torch.arange(L, device=encodings.device).clamp(max=cap).expand(B, L)  # [B, L]
        end = (mask.sum(1, keepdim=True) - 1 - torch.arange(L, device=encodings.device)).clamp(0, cap)  # [B, L]
        x = self.inp(self._scaled(encodings)) + self.from_start(start) + self.from_end(end)  # [B, L, H]
        pad = ~mask
        if self.config.query:
            if query is None or features is None:
                raise InputError("this learned policy is query-conditioned: it needs the question.")
            x = torch.cat([self.query_inp(self._scaled(query))[:, None], x + self.features(features.float())], 1)  # [B, 1+L, H]
            pad = torch.cat([pad.new_zeros(B, 1), pad], 1)  # [B, 1+L]
        h = self.body(x, src_key_padding_mask=pad)[:, -L:]  # [B, L, H]
        logits = self.head(h).squeeze(-1)  # [B, L]
        if self.config.lexical_prior:
            logits = logits + self.prior * features[..., BM25_FEATURE].float()  # the scaled BM25 of each chunk
        return logits.masked_fill(~mask, float("-inf"))  # [B, L]

    def _scaled(self, encodings: torch.Tensor) -> torch.Tensor:
        """[..., E] -> fp32, unit length along E when ``unit_inputs``."""
        x = encodings.float()
        return nn.functional.normalize(x, dim=-1) if self.config.unit_inputs else x

    def score(self, encodings: torch.Tensor, query: QueryInputs | None = None) -> torch.Tensor:
        """One context: encodings [L, E] -> logits [L], in fp32 outside any autocast (sampling and PPO ratios
        need the precision)."""
        mask = torch.ones(1, encodings.shape[0], dtype=torch.bool, device=encodings.device)
        with torch.autocast(device_type=encodings.device.type, enabled=False):
            if query is None:
                return self(encodings[None].float(), mask)[0]
            return self(encodings[None].float(), mask, query.encoding[None], query.features[None])[0]


def sample_orders(logits: torch.Tensor, count: int, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``samples`` draws of ``count`` distinct chunks, in pick order, from pointer-masked sequential sampling
    (softmax over the chunks not yet picked, step by step): exactly the Gumbel top-k of the logits.
    logits [L] -> [samples, count]."""
    L = int(torch.isfinite(logits).sum())
    if not 0 <= count <= L:
        raise InputError(f"cannot pick {count} of {L} chunks.")
    u = torch.rand(samples, logits.shape[-1], generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u)).to(device=logits.device, dtype=logits.dtype)  # drawn on the CPU: seeded
    return (logits.detach()[None] + gumbel).topk(count, dim=-1).indices


def order_log_prob(logits: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """log P(order) under pointer-masked sequential sampling: sum over picks of log softmax over the chunks
    still available. logits [B, L], orders [B, G, T] -> [B, G]."""
    B, G, T = orders.shape
    scores = logits[:, None].expand(B, G, -1).float()  # [B, G, L]
    taken = torch.zeros_like(scores, dtype=torch.bool)
    total = scores.new_zeros(B, G)
    for t in range(T):
        pick = orders[..., t : t + 1]  # [B, G, 1]
        available = scores.masked_fill(taken, float("-inf"))
        total = total + scores.gather(-1, pick).squeeze(-1) - available.logsumexp(-1)
        taken = taken.scatter(-1, pick, True)
    return total


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO: each reward standardised within its group (the G selections of one example). [B, G] -> [B, G]."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + 1e-6)


def clipped_objective(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate as a loss to minimise: -mean(min(r A, clip(r, 1 - e, 1 + e) A)), r = new / old."""
    ratio = (new_log_prob - old_log_prob.detach()).exp()
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


@dataclass
class LearnedPolicy:
    """The trained network at the ``ExpansionPolicy`` seam: scores = its logits (greedy = top-T' of them).
    ``encode``: the chunk encoder, which a query-conditioned network needs for the question."""

    network: PolicyNetwork
    encode: Encode | None = None

    def scores(self, chunks, encodings, question) -> list[float]:
        if encodings is None:
            raise InputError("the learned policy needs the chunks' encodings.")
        with torch.inference_mode():
            query = None
            if self.network.config.query:
                if self.encode is None:
                    raise InputError("a query-conditioned learned policy needs the chunk encoder (make_policy with "
                                     "the model).")
                query = query_inputs(self.encode, chunks, encodings, question)
            return self.network.score(encodings, query).tolist()


def save_policy(network: PolicyNetwork, folder: Path) -> None:
    """``folder``/policy.safetensors + policy.json (inside a checkpoint being written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in network.state_dict().items()},
              str(folder / WEIGHTS))
    config = asdict(network.config)
    if not config["lexical_prior"]:  # the field's default: files stay readable by versions without it
        del config["lexical_prior"]
    write_json_atomic(folder / CONFIG, config)


def load_policy(folder: Path) -> PolicyNetwork:
    """The network saved by :func:`save_policy`; a damaged or mismatched file is a CheckpointError."""
    try:
        config = {"unit_inputs": False, **json.loads((folder / CONFIG).read_text(encoding="utf-8"))}  # older files
        network = PolicyNetwork(PolicyNetConfig(**config))
        network.load_state_dict(load_file(str(folder / WEIGHTS)))
    except Exception as e:  # missing files, bad JSON, wrong shapes; safetensors raises its own error types
        raise CheckpointError(f"{folder}: the learned policy is missing or damaged ({e}); retrain it with "
                              "`refrag train policy` or remove the folder.") from e
    return network.requires_grad_(False).eval()
