"""TTFT / TTIT with torch's thread settings on an idle machine and with one core kept busy by another process.

    python scripts/shared_cores.py [--length 512] [--repeats 2] [--out docs/bench/shared_cores.json]

Each setting runs `refrag bench ttft` in a fresh process (OpenMP reads OMP_WAIT_POLICY once, at start-up):
two threads with OpenMP's own default wait policy (spin, then sleep; OMP_WAIT_POLICY set empty, so refrag's
default does not apply), `--threads 1`, and two threads with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep
instead of spinning: refrag's default since this measurement). "busy" starts a pure-Python busy loop (one
core at 100%) for the duration of the run, as another user's job would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SETTINGS = {  # name -> (extra CLI flags, extra environment)
    "default (2 threads)": ([], {"OMP_WAIT_POLICY": ""}),
    "--threads 1": (["--threads", "1"], {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if enabled else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def run(flags: list[str], env: dict[str, str], length: int, repeats: int, timeout: float) -> dict:
    command = [sys.executable, "-m", "refrag.cli", "bench", "ttft", "--lengths", str(length), "--repeats",
               str(repeats), "--batch", "0", "--dtype", "float32", "--json", *flags]
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=timeout,
                             check=True).stdout
    except subprocess.TimeoutExpired:
        return {"timed_out_s": timeout}
    row = json.loads(out)["rows"][0]
    return {"ttft_full_s": row["ttft_full_s"], "ttft_refrag_s": row["ttft_cached_s"],
            "ttit_full_ms": 1e3 * row["ttit_full_s"], "ttit_refrag_ms": 1e3 * row["ttit_refrag_s"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as hung")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for busy in (False, True):
        for name, (flags, env) in SETTINGS.items():
            with busy_core(busy):
                result = {"machine": "one core busy" if busy else "idle", "setting": name,
                          **run(flags, env, args.length, args.repeats, args.timeout)}
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out is not None:
        args.out.write_text(json.dumps({"length": args.length, "repeats": args.repeats, "cpus": os.cpu_count(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
