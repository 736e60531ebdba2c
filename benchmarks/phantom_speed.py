"""Phantom generation speed: 20 CT cases of 64x192x192 with 3 phases (the issue asks <= 60 s).

Writes benchmarks/results/phantom_speed.json and prints it. Also times writing the cases as an
nnU-Net raw dataset (not part of the 60 s budget). Run: .venv/bin/python benchmarks/phantom_speed.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy

from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw

RESULT = Path(__file__).resolve().parent / "results" / "phantom_speed.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--shape", nargs=3, type=int, default=(64, 192, 192))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    config = PhantomConfig(shape=tuple(args.shape))
    start = time.perf_counter()
    cases = generate_cases(args.n, config, args.seed, progress=True)
    generate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_nnunet_raw(tmp, 999, "PhantomSpeed", cases)
        write_s = time.perf_counter() - start
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "phantom generation",
        "n_cases": args.n,
        "shape_zyx": list(config.shape),
        "phases": list(config.phases),
        "modality": config.modality,
        "seed": args.seed,
        "generate_seconds": round(generate_s, 2),
        "seconds_per_case": round(generate_s / max(args.n, 1), 3),
        "budget_seconds": args.budget_s,
        "within_budget": generate_s <= args.budget_s,
        "write_nnunet_raw_seconds": round(write_s, 2),
        "n_lesions": int(sum(len(c.lesions) for c in cases)),
        "machine": {"cpu_count": os.cpu_count(), "load_average_1_5_15": load, "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
