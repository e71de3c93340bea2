"""Weight-only quantization kernels on this CPU: 8 linear layers of SmolLM2-135M's MLP shapes (576 <-> 1536),
fp32 / bf16 / torchao int8 / optimum-quanto int8 and int4, 1 row (a decode step) and 512 rows (a prefill).

    python scripts/bench_quant_kernels.py        (needs pip install 'refrag[quantize]'; run on an idle machine)
"""

import copy
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)


def layers() -> torch.nn.Module:
    return torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576))]).eval()


def timed(module: torch.nn.Module, rows: int, dtype: torch.dtype, context) -> float:
    x = torch.randn(rows, 576, dtype=dtype)
    with context():
        for _ in range(3):
            module(x)
        t = time.perf_counter()
        for _ in range(20):
            module(x)
    return (time.perf_counter() - t) / 20 * 1e3


def main() -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    base = layers()
    variants = {"fp32": (copy.deepcopy(base), torch.float32), "bf16": (copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16)}
    q8 = copy.deepcopy(base)
    quantize(q8, weights=qint8)
    freeze(q8)
    variants["quanto int8"] = (q8, torch.float32)
    q4 = copy.deepcopy(base)
    with torch.inference_mode():  # quanto's int4 weights must be inference tensors to run under inference_mode
        quantize(q4, weights=qint4)
        freeze(q4)
    variants["quanto int4"] = (q4, torch.float32)
    t8 = copy.deepcopy(base)
    quantize_(t8, Int8WeightOnlyConfig())
    variants["torchao int8"] = (t8, torch.float32)
    print(f"{'weights':14s} {'1 row':>10s} {'512 rows':>10s}   (ms, torch.inference_mode, 2 threads)")
    for name, (module, dtype) in variants.items():
        print(f"{name:14s} {timed(module, 1, dtype, torch.inference_mode):10.3f} "
              f"{timed(module, 512, dtype, torch.inference_mode):10.2f}")


if __name__ == "__main__":
    main()
