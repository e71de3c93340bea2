"""Training state: a folder (written atomically) holding everything an EXACT resume needs.

``<out>/checkpoint/``: ``model/`` (a plain refrag checkpoint, loadable by ``refrag.load_model`` for eval),
``trainable.safetensors`` (fp32 master weights of every trained parameter), ``optimizer.safetensors`` +
``trainer.json`` (AdamW moments and step counts, param groups, the step, the RNG state). No pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refrag import checkpoint
from refrag.errors import CheckpointError
from refrag.io import atomic_dir, write_json_atomic
from refrag.modeling import RefragModel

CHECKPOINT = "checkpoint"
FINAL = "final"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps done
    stage: str


def trainable_names(model: RefragModel) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_model(model: RefragModel, path: Path, stage: str, step: int) -> Path:
    """A refrag checkpoint recording its stage; trained parts are saved, frozen ones referenced by name (a
    LoRA adapter is saved on its own, the decoder it adapts stays referenced)."""
    model.config = replace(model.config, extra={**model.config.extra, "stage": stage, "steps": str(step)})
    params = dict(model.named_parameters())
    train_enc = any(params[n].requires_grad for n in params if n.startswith("encoder."))
    train_dec = any(params[n].requires_grad for n in params if n.startswith("decoder.") and "lora_" not in n)
    return checkpoint.save(model, path, save_encoder=train_enc or _inside_checkpoint(model.config.encoder),
                           save_decoder=train_dec or (_inside_checkpoint(model.config.decoder) and not model.has_adapter))


def _inside_checkpoint(spec: str) -> bool:
    """A component loaded from inside another checkpoint (e.g. the previous stage's trained encoder): it is
    copied into the new checkpoint, never referenced by that checkpoint's path."""
    return (Path(spec).parent / checkpoint.MANIFEST).is_file()


def save_state(out_dir: Path, model: RefragModel, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    params = dict(model.named_parameters())
    names = trainable_names(model)
    with atomic_dir(out_dir / CHECKPOINT) as tmp:
        save_model(model, tmp / "model", state.stage, state.step)
        save_file({n: params[n].detach().float().contiguous() for n in names}, str(tmp / "trainable.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{key}": v.detach().contiguous() for i, st in opt["state"].items() for key, v in st.items()}
        tensors["torch_rng"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json_atomic(tmp / "trainer.json", {
            "step": state.step, "stage": state.stage, "trainable": names, "param_groups": opt["param_groups"],
        })


def load_state(out_dir: Path, model: RefragModel, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore trained weights, optimizer moments and RNG from ``<out>/checkpoint``; returns the step."""
    folder = out_dir / CHECKPOINT
    try:
        meta = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
        weights = load_file(str(folder / "trainable.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder} is incomplete ({e}); delete it to start over, or drop --resume.") from e
    if meta["trainable"] != trainable_names(model):  # a run saved before text encoders were wrapped (encoder.X)
        rename = {n: "encoder.model." + n[len("encoder."):] for n in meta["trainable"]
                  if n.startswith("encoder.") and not n.startswith("encoder.model.")}
        meta["trainable"] = [rename.get(n, n) for n in meta["trainable"]]
        weights = {rename.get(n, n): w for n, w in weights.items()}
    if meta["trainable"] != trainable_names(model):
        raise CheckpointError(
            f"{folder} trained other parameters than this run would ({len(meta['trainable'])} vs "
            f"{len(trainable_names(model))} tensors): resume with the same command and options."
        )
    params = dict(model.named_parameters())
    if changed := [n for n, w in weights.items() if w.shape != params[n].shape]:
        raise CheckpointError(f"{folder} has {changed[0]} of another shape than this run's (e.g. another "
                              "--lora-rank): resume with the same command and options.")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key != "torch_rng":
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return TrainerState(step=int(meta["step"]), stage=meta["stage"])
