"""Training throughput in one process and in N data-parallel processes under torchrun.

Trains the default backend with its default options for a fixed number of steps, once as one process
(all CPU threads) and once as `torchrun --nproc-per-node N` (the threads split between the processes;
one GPU each with --device cuda), and prints the training seconds, steps per second and crops per
second of each (N processes train on N times the crops per step: `--batch-size` is per process).

    python scripts/training_scaling.py [--input NORMAL_SCANS] [--processes 2] [--iterations 100] [--device cpu]
    python scripts/training_scaling.py --precision    # one process in float32, then in mixed precision

With --precision it compares one process in float32 (ANOMALYFLAG_PRECISION=float32) with one in the
device's mixed precision (bfloat16 on a CPU with AMX or AVX512-BF16; see AnomalyFlagLib.devices).

Without --input it makes 8 normal phantoms (256x256x48) to train on.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))


def run(processes: int, data: Path, out: Path, iterations: int, device: str, precision: str = "auto") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"), ANOMALYFLAG_PRECISION=precision)
    args = ["train", "--input", str(data), "--output", str(out), "--iterations", str(iterations),
            "--checkpoint-every", str(10**9), "--device", device]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, "-m", "AnomalyFlagLib"] + args
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "AnomalyFlagLib"] + args  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads((out / "metadata.json").read_text())
    seconds = meta["training"]["training_s"]
    batch = meta[meta["backend"]]["training_options"].get("batch_size", 1)
    return {"processes": processes, "training_s": seconds, "steps_per_s": iterations / seconds,
            "crops_per_s": iterations * batch * processes / seconds,
            "precision": meta["training"].get("precision", {}).get("training", "float32")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", action="store_true", help="compare float32 with mixed precision instead")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.input
        if data is None:
            from AnomalyFlagLib.phantom import make_phantom_set

            data = Path(tmp) / "normal"
            make_phantom_set(data, num_cases=8, anomalous=False, seed=0, num_slices=48, size=256)
        if a.precision:
            rows = [run(1, data, Path(tmp) / p, a.iterations, a.device, p) for p in ("float32", "auto")]
        else:
            rows = [run(n, data, Path(tmp) / f"model{n}", a.iterations, a.device) for n in (1, a.processes)]
    print(f"{a.iterations} steps of the default backend on {a.device} ({os.cpu_count()} CPU cores):")
    for r in rows:
        print(f"  {r['processes']} process(es), {r['precision']}: {r['training_s']:.1f} s, "
              f"{r['training_s'] / a.iterations:.3f} s/step, {r['crops_per_s']:.1f} crops/s")  # fmt: skip
    change = "in " + rows[1]["precision"] if a.precision else f"with {a.processes} processes"
    print(f"  throughput x{rows[1]['crops_per_s'] / rows[0]['crops_per_s']:.2f} {change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
