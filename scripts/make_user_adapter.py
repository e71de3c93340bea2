"""Make a stand-in for a user's own LoRA fine-tune of the default decoder (issue 17's composition measurement).

A rank-8 LoRA (attention + MLP projections) trained by next-token cross-entropy on 256-token windows of one
training-allowed file (default: the State of the Union addresses), saved in peft's safetensors format, so that
``--decoder-adapter OUT`` has a real, domain-shifted adapter to compose with the shipped compressor.

    python scripts/make_user_adapter.py --out runs/user-adapter [--steps 60] [--data ../shared/data/sotu.txt]
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import refrag  # noqa: F401  (environment defaults)
from refrag.models import resolve

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sotu.txt"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    path = resolve("smollm2-135m").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    ids = tokenizer(args.data.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]  # [N]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = [rng.randrange(0, len(ids) - args.window) for _ in range(args.batch_size)]
        batch = torch.stack([ids[o : o + args.window] for o in offsets])  # [B, W]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.replace(args.out)  # written whole, then renamed
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
