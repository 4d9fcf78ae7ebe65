#!/usr/bin/env python
"""A `hybrid` bundle from a restoration bundle and a StyleGAN2 bundle trained apart, calibrated anew.

The two must share their preprocessing (windows, size, field of view); the hybrid gets the restoration
bundle's score settings. Calibrate on normal scans neither member trained on: `--calibrate-on` a folder
of the held-out subjects (each bundle's metadata.json lists its `calibration_cases`).

    python scripts/assemble_hybrid.py --restoration MODEL_A --stylegan2 MODEL_B --calibrate-on HELD_OUT --output OUT
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restoration", required=True, help="bundle of backend 'restoration'")
    parser.add_argument("--stylegan2", required=True, help="bundle of backend 'stylegan2'")
    parser.add_argument("--calibrate-on", required=True, help="folder of normal scans neither member trained on")
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from AnomalyFlagLib.bundle import load_bundle, new_bundle, save_bundle
    from AnomalyFlagLib.config import config_to_dict
    from AnomalyFlagLib.detectors.composite import join_configs
    from AnomalyFlagLib.detectors.hybrid import HybridArchitecture, HybridOptions
    from AnomalyFlagLib.devices import select_device
    from AnomalyFlagLib.io.cases import discover_cases
    from AnomalyFlagLib.training import calibrate_on
    from AnomalyFlagLib.training_slices import load_slices

    device = select_device(args.device)
    local, stylegan = load_bundle(args.restoration), load_bundle(args.stylegan2)
    for bundle, path, backend in ((local, args.restoration, "restoration"), (stylegan, args.stylegan2, "stylegan2")):
        if bundle.metadata.get("backend") != backend:
            raise SystemExit(f"{path}: a bundle of backend '{bundle.metadata.get('backend')}', not '{backend}'")
    if config_to_dict(local.preprocess) != config_to_dict(stylegan.preprocess):
        raise SystemExit("the two bundles preprocess slices differently; train them with the same settings")
    architecture = join_configs(HybridArchitecture, local.backend.architecture, stylegan.backend.architecture)
    options = join_configs(HybridOptions, local.options, stylegan.options)
    hybrid = new_bundle("hybrid", architecture, options, local.preprocess, local.scoring, name=Path(args.output).name)
    for member, trained in ((hybrid.backend.local, local), (hybrid.backend.stylegan, stylegan)):
        weights = trained.backend.networks()
        for name, net in member.networks().items():
            net.load_state_dict(weights[name].state_dict())
    hybrid.backend.to(device).eval()
    cases = discover_cases(args.calibrate_on, "calibration input")
    slices = load_slices(cases, hybrid.preprocess)
    print(f"Calibrating on {len(slices)} normal slices of {len(cases)} case(s) ...")
    calibrate_on(hybrid, slices, len(cases), device)
    summary = {"assembled_from": {"restoration": str(args.restoration), "stylegan2": str(args.stylegan2)},
               "calibration_input": str(args.calibrate_on), "calibration_slices": len(slices)}  # fmt: skip
    print(f"Wrote {save_bundle(hybrid, Path(args.output), training_summary=summary)}; "
          f"global term weight {float(hybrid.statistics.slice_weight[0]):.3g}.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
