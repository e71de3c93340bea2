"""The one training loop every recipe shares.

AdamW (fused) on the parameters that require grad, linear warm-up then cosine decay, gradient accumulation
to the target batch, grad-norm clipping, bf16 autocast over fp32 master weights, optional gradient
checkpointing, periodic held-out evaluation, atomic checkpoints with exact resume, a progress bar and metric
loggers. Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) each rank trains on its slice of every
batch and gradients are averaged with torch.distributed (data parallel; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.precision import resolve_bf16
from refrag.train.loggers import MetricLogger, make_loggers
from refrag.train.objectives import Example, Score, Task
from refrag.train.state import FINAL, TrainerState, load_state, save_model, save_state


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation and bookkeeping for one stage."""

    out_dir: Path  # checkpoint/, final/, metrics.csv go here
    steps: int  # optimizer steps
    batch_size: int = 8  # examples per optimizer step, all ranks together
    micro_batch_size: int = 8  # examples per forward/backward (gradient accumulation in between)
    lr: float | None = None  # peak learning rate; None: the recipe's (the paper's for its stage)
    warmup_fraction: float = 0.04
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool | None = None  # bf16 autocast (master weights stay fp32); None: where bf16 is native (precision)
    gradient_checkpointing: bool = False
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    resume: bool = False  # continue from <out_dir>/checkpoint
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total: tests, ablations
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time in this run: time boxes
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "bf16", resolve_bf16(self.bf16))  # a bool from here on
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1 (got {self.steps}).")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise InputError("--batch-size and --micro-batch-size must be >= 1.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise InputError(f"--max-minutes must be > 0 (got {self.max_minutes}).")
        if self.lr is not None and self.lr <= 0:
            raise InputError(f"--lr must be > 0 (got {self.lr}).")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    eval: dict[int, Score]  # held-out scores by number of chunks
    final_dir: Path | None  # None when stopped early (stop_after)


def lr_factor(step: int, options: TrainOptions) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay."""
    warm = max(1, round(options.steps * options.warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, options.steps - warm)
    return options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """Split one step's examples into micro-batches of similar length (a batch is padded to its longest
    example, so a curriculum batch mixing 1- and 32-chunk contexts would mostly compute padding)."""
    ordered = sorted(examples, key=lambda ex: len(ex.context) + len(ex.target))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(model: RefragModel, task: Task, batch_size: int, bf16: bool) -> dict[int, Score]:
    model.eval()
    with _autocast(bf16):
        scores = task.evaluate(model, batch_size)
    model.train()
    return scores


def eval_metrics(scores: dict[int, Score]) -> dict[str, float]:
    """Held-out scores as logged metrics: ``eval/log_ppl_{n}xk`` and ``eval/acc_{n}xk`` per key n."""
    return {f"eval/{name}_{n}xk": value for n, s in scores.items()
            for name, value in (("log_ppl", s.log_ppl), ("acc", s.accuracy))}


def _autocast(bf16: bool):
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16) \
        if bf16 else contextlib.nullcontext()


def _accumulate(model: RefragModel, task: Task, examples: list[Example], options: TrainOptions) -> tuple[float, int]:
    """Forward/backward over one step's examples in micro-batches (gradients summed to the step's mean loss);
    returns the summed example losses and the decoder positions that carried a target or a chunk vector."""
    loss_sum, tokens = 0.0, 0
    for micro in micro_batches(examples, options.micro_batch_size):
        with _autocast(options.bf16):
            loss = task.loss(model, micro)
        (loss * len(micro) / len(examples)).backward()
        loss_sum += float(loss.detach()) * len(micro)
        tokens += task.positions(micro)
    return loss_sum, tokens


def _all_reduce_mean(params: list[torch.nn.Parameter], world: int) -> None:
    """Data parallel: every rank ends with the mean gradient of all ranks."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGTERM / Ctrl-C while training sets the event: the loop finishes its step, checkpoints and stops
    (a --resume continues exactly); a second signal stops at once. Only the main thread can own signals."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, frame: object) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        tqdm.write(f"{signal.Signals(signum).name}: checkpointing after this step, then stopping "
                   "(send it again to stop at once).")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python


def _should_stop(started: float, minutes: float | None, requested: threading.Event, world: int,
                 device: torch.device) -> bool:
    """Whether the time box is spent or a stop was requested, decided for all ranks at once (ranks stopping
    apart would hang all_reduce; the flag lives on the model's device, as NCCL needs)."""
    up = requested.is_set() or (minutes is not None and time.perf_counter() - started > 60 * minutes)
    flag = torch.tensor(float(up), device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def train(model: RefragModel, task: Task, options: TrainOptions) -> TrainResult:
    """Run (or resume) one stage. Parameters with requires_grad are trained; the rest stay frozen."""
    if options.lr is None:
        raise InputError("TrainOptions.lr is unset: run a stage recipe (it sets the paper's rate) or give --lr.")
    rank, world = init_distributed()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("nothing to train: every parameter is frozen.")
    optimizer = torch.optim.AdamW(
        params, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay,
        fused=all(p.dtype == torch.float32 for p in params),
    )
    if options.gradient_checkpointing:
        model.encoder.gradient_checkpointing()
        model.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": model.chunk_scope.checkpoint_contexts})
    step = 0
    if options.resume and (options.out_dir / "checkpoint").exists():
        step = load_state(options.out_dir, model, optimizer).step
    loggers: list[MetricLogger] = make_loggers(options.out_dir, step, task.stage) if rank == 0 else []
    last = options.steps if options.stop_after is None else min(options.steps, options.stop_after)
    bar = tqdm(total=options.steps, initial=step, disable=not options.progress or rank != 0, desc=task.stage)
    model.train()
    loss_value, scores = float("nan"), {}
    started = time.perf_counter()
    if step == 0 and options.eval_every:  # the starting point, so every curve shows what training changed
        start = eval_metrics(evaluate(model, task, options.micro_batch_size, options.bf16))
        for lg in loggers:
            lg.log_dict(start, 0)
    with _stop_requests() as requested:
        while step < last:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = options.lr * lr_factor(step, options)
            mine = task.examples(step, options.batch_size)[rank::world]  # this rank's share of the batch
            loss_sum, tokens = _accumulate(model, task, mine, options)
            if world > 1:
                _all_reduce_mean(params, world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss_sum / max(len(mine), 1)
            elapsed = time.perf_counter() - t0
            metrics = {"train/loss": loss_value, "train/lr": optimizer.param_groups[0]["lr"],
                       "train/grad_norm": grad_norm, "train/positions_per_s": tokens * world / elapsed,
                       "train/elapsed_s": time.perf_counter() - started}  # wall time of this run (not of resumed ones)
            if options.eval_every and step % options.eval_every == 0 or step == options.steps:
                scores = evaluate(model, task, options.micro_batch_size, options.bf16)
                metrics |= eval_metrics(scores)
            for lg in loggers:
                lg.log_dict(metrics, step)
            bar.set_postfix(loss=f"{loss_value:.3f}", pos_s=f"{metrics['train/positions_per_s']:.0f}")
            bar.update(1)
            if _should_stop(started, options.max_minutes, requested, world, params[0].device):
                last = step  # time box spent or SIGTERM / Ctrl-C: checkpoint now and stop (--resume continues)
            if rank == 0 and (options.save_every and step % options.save_every == 0 or step == last):
                save_state(options.out_dir, model, optimizer, TrainerState(step, task.stage))
    bar.close()
    for lg in loggers:
        lg.close()
    final_dir = None
    if step >= options.steps and rank == 0:
        final_dir = save_model(model, options.out_dir / FINAL, task.stage, step)
    return TrainResult(steps=step, final_loss=loss_value, eval=scores, final_dir=final_dir)
