"""Scoring benchmark: a 512x512xN CT volume with the default model configuration, on this machine.

Prints slices per second, seconds per volume (heatmap included), peak RSS and achieved GFLOP/s for
N = 300, and the peak RSS for 100 and 600 slices (it must not grow with the slice count). Each
measurement runs in a fresh process so peak RSS is its own.

    python scripts/benchmark.py [--model Resources/Models/AnomalyFlagDemoChestCT] [--device cpu]
    ANOMALYFLAG_PRECISION=float32 python scripts/benchmark.py    # without mixed precision
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "Resources" / "Models" / "AnomalyFlagDemoChestCT"


def make_volume(path: Path, slices: int) -> None:
    """A 512x512 CT-like volume written as gzip NRRD, built slab by slab from one phantom block."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "AnomalyFlag"))
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagLib.phantom import make_phantom

    block = make_phantom(num_slices=50, size=512, spacing=(0.8, 0.8, 2.0), seed=3).image
    header = [
        "NRRD0004", "type: int16", "dimension: 3", "space: left-posterior-superior",
        f"sizes: 512 512 {slices}", "space directions: (0.8,0,0) (0,0.8,0) (0,0,2)",
        "kinds: domain domain domain", "endian: little", "encoding: raw", "space origin: (-204.4,-204.4,0)",
    ]  # fmt: skip
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n\n").encode())
        for k in range(slices):  # walk back and forth through the block so anatomy stays continuous
            j = k % 98
            f.write(block[j if j < 50 else 97 - j].astype("<i2").tobytes())
    del Geometry, np


def measure(model: str, volume: str, out: str, device: str, batch_size) -> dict:
    """Run in a child process: score one volume to files, as `anomalyflag score` does."""
    sys.path.insert(0, str(ROOT / "AnomalyFlag"))
    import torch
    from AnomalyFlagLib.devices import precision_name
    from AnomalyFlagLib.io.cases import Case
    from AnomalyFlagLib.io.scored_case import score_cases
    from AnomalyFlagLib.scoring import Scorer
    from torch.utils.flop_counter import FlopCounterMode

    scorer = Scorer(model, device=device, batch_size=batch_size)
    size = scorer.bundle.preprocess.image_size
    x = torch.zeros(scorer.batch_size, 1, size, size, device=scorer.device)
    pos = torch.full((scorer.batch_size,), 0.5, device=scorer.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        scorer.bundle.score_batch(x, pos, scorer.pre.body_mask(x))
    flops_per_slice = counter.get_total_flops() / scorer.batch_size
    start = time.perf_counter()
    (outcome,) = score_cases(scorer, [Case("bench", Path(volume))], out)
    result = outcome.result
    seconds = time.perf_counter() - start
    n = len(result.slices)
    return {
        "slices": n,
        "seconds_per_volume": round(seconds, 2),
        "slices_per_second": round(n / seconds, 1),
        "network_gflop_per_slice": round(flops_per_slice / 1e9, 3),
        "achieved_gflop_per_s": round(flops_per_slice * n / result.timings["compute"] / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(scorer.device),
        "precision": precision_name(scorer.device),
        "batch_size": scorer.batch_size,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 100, 600])
    parser.add_argument("--child", nargs=3, metavar=("VOLUME", "OUT", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        volume, out, report = args.child
        Path(report).write_text(json.dumps(measure(args.model, volume, out, args.device, args.batch_size)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.slices:
            volume = Path(tmp) / f"ct_{n}.nrrd"
            make_volume(volume, n)
            report = Path(tmp) / f"r{n}.json"
            cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device,
                   "--child", str(volume), tmp, str(report)]  # fmt: skip
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            subprocess.run(cmd, check=True)
            results.append(json.loads(report.read_text()))
            volume.unlink()
            r = results[-1]
            print(f"{n:4d} slices 512x512: {r['seconds_per_volume']:6.2f} s/volume, {r['slices_per_second']:6.1f} "
                  f"slices/s, peak RSS {r['peak_rss_mb']:7.1f} MB, {r['achieved_gflop_per_s']:6.1f} GFLOP/s "
                  f"({r['network_gflop_per_slice']} GFLOP/slice, {r['device']} {r['precision']}, "
                  f"batch {r['batch_size']}, {r['torch_threads']} threads)")  # fmt: skip
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
