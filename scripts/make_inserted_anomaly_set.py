"""Insert synthetic anomalies (lesions, a metal stent, fluid) into real CT volumes, with exact masks.

For evaluating a model on the anatomy it was trained for: each output case is `<name>_ins<N>.nrrd` with
`<name>_ins<N>_anomaly.nrrd` (the inserted anomalies plus, when given, the volume's own lesion label),
ready for `anomalyflag evaluate`.

    python scripts/make_inserted_anomaly_set.py --output data/inserted \
        data/sample/lung1_image.nrrd:data/sample/lung1_label.nrrd \
        data/sample/lung2_image.nrrd:data/sample/lung2_label.nrrd
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AnomalyFlag"))
from AnomalyFlagLib.io.volumes import case_name, write_image_atomic  # noqa: E402
from AnomalyFlagLib.phantom import ANOMALY_KINDS, insert_anomaly  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+", help="IMAGE or IMAGE:LABEL (the label's lesions count as anomalies)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--copies", type=int, default=3, help="cases made from each volume")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for spec in args.volumes:
        image_path, _, label_path = spec.partition(":")
        image = sitk.ReadImage(image_path)
        array = sitk.GetArrayFromImage(image)
        own = sitk.GetArrayFromImage(sitk.ReadImage(label_path)) > 0 if label_path else np.zeros(array.shape, bool)
        stem = case_name(Path(image_path)).replace("_image", "")
        for copy in range(args.copies):
            volume, mask = array.copy(), own.copy()
            kinds = rng.choice(ANOMALY_KINDS, size=int(rng.integers(1, 4)))
            for kind in kinds:
                volume, one = insert_anomaly(volume, str(kind), rng, spacing=image.GetSpacing())
                mask |= one > 0
            name = f"{stem}_ins{copy}"
            for array_out, suffix in ((volume, ""), (mask.astype(np.uint8), "_anomaly")):
                written = sitk.GetImageFromArray(array_out)
                written.CopyInformation(image)
                write_image_atomic(written, out / f"{name}{suffix}.nrrd")
            print(f"{name}: {', '.join(map(str, kinds))}; {int(mask.any(axis=(1, 2)).sum())} anomalous slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
