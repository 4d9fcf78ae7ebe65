"""Training a detector on normal scans and calibrating it on held-out normal slices."""

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .bundle import Bundle, load_bundle, new_bundle, save_bundle
from .calibration import Calibration, calibrate
from .config import ModelConfig, PreprocessConfig, ScoreConfig
from .datasets import SliceSet, discover_cases, load_slices, split_cases, split_slices
from .detector import TrainingOptions
from .devices import autocast_for, select_device
from .errors import InputError
from .preprocessing import SlicePreprocessor

MAX_CALIBRATION_PIXELS = 400_000
RESUMABLE_OPTIONS = ("gan_iterations", "encoder_iterations", "checkpoint_every")


class Checkpointer:
    """Saves and restores training state with torch.save / torch.load(weights_only=True)."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.resume = resume

    def restore(self, networks, optimizers, generator: torch.Generator) -> dict:
        if not (self.resume and self.path.is_file()):
            return {}
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling refusal or damage
            raise InputError(f"checkpoint '{self.path}' cannot be resumed: {exc}") from None
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"checkpoint '{self.path}' was made with other settings or data; delete it or train without --resume."
            )
        for name, net in networks.items():
            net.load_state_dict(state["networks"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        generator.set_state(state["rng"])
        return {"stage": state["stage"], "step": int(state["step"])}

    def save(self, networks, optimizers, generator: torch.Generator, where: dict) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "networks": {k: v.state_dict() for k, v in networks.items()},
            "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
            "rng": generator.get_state(),
            **where,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


@torch.no_grad()
def score_slice_set(bundle: Bundle, slices: SliceSet, device, batch_size: int = 64):
    """Combined scores and a subsample of normal body residuals for calibration."""
    pre = SlicePreprocessor(bundle.preprocess, bundle.model_config.image_size)
    combined, residuals = [], []
    gen = torch.Generator().manual_seed(0)
    per_batch = max(1, MAX_CALIBRATION_PIXELS // max(1, (len(slices) + batch_size - 1) // batch_size))
    for k0 in range(0, len(slices), batch_size):
        x = slices.images[k0 : k0 + batch_size].float().to(device)
        pos = slices.positions[k0 : k0 + batch_size].to(device)
        body = pre.body_mask(x)
        with autocast_for(device):
            s = bundle.detector.score_batch(x, pos, body)
        combined.append((s.reconstruction + bundle.scoring.kappa * s.feature).float().cpu())
        inside = s.residual[body[:, 0]].float().cpu()
        if inside.numel() > per_batch:
            inside = inside[torch.randperm(inside.numel(), generator=gen)[:per_batch]]
        residuals.append(inside)
    return torch.cat(combined).numpy(), torch.cat(residuals).numpy()


def calibrate_on(
    bundle: Bundle, slices: SliceSet, num_cases: int, device, target_rate: Optional[float] = None
) -> Calibration:
    combined, residuals = score_slice_set(bundle, slices, device)
    sc = bundle.scoring
    if target_rate is not None:
        sc.target_false_flag_rate = float(target_rate)
    return calibrate(
        combined,
        slices.positions.numpy(),
        residuals,
        num_cases=num_cases,
        position_bins=sc.position_bins,
        target_false_flag_rate=sc.target_false_flag_rate,
        pixel_false_positive_rate=sc.pixel_false_positive_rate,
    )


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(
    input_path,
    output,
    model_config: ModelConfig = None,
    preprocess: PreprocessConfig = None,
    scoring: ScoreConfig = None,
    options: TrainingOptions = None,
    validation_fraction: float = 0.2,
    resume: bool = False,
    device: str = "auto",
    backend: str = "fanogan",
    progress: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train on the normal volumes at `input_path`, calibrate on held-out normal cases, save a bundle."""
    model_config = model_config or ModelConfig()
    preprocess = preprocess or PreprocessConfig()
    scoring = scoring or ScoreConfig()
    options = options or TrainingOptions()
    model_config.validate()
    output = Path(output)
    dev = select_device(device)
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.time()
    cases = discover_cases(input_path)
    log(f"Loading {len(cases)} case(s) from {input_path} ...")
    slices = load_slices(cases, preprocess, model_config.image_size, cancel=cancel)
    train_ids, val_ids = split_cases(len(cases), validation_fraction, options.seed)
    if val_ids:
        train_set, val_set = slices.subset(train_ids), slices.subset(val_ids)
    else:
        train_set, val_set = split_slices(slices)
    if len(train_set) < 8 or len(val_set) < 10:
        raise InputError(
            f"too few normal slices to train and calibrate ({len(train_set)} training, {len(val_set)} held out); "
            "at least 8 and 10 are needed."
        )
    log(
        f"{len(train_set)} training slices, {len(val_set)} held-out normal slices for calibration, "
        f"{slices.excluded_slices} masked slices excluded."
    )
    bundle = new_bundle(backend, model_config, preprocess, scoring, name=output.name)
    bundle.detector.to(dev)
    work = output.with_name(output.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    # Iteration counts may change on resume (to extend or shorten a run); everything else must match.
    resumable = {k: v for k, v in asdict(options).items() if k not in RESUMABLE_OPTIONS}
    fingerprint = _fingerprint(asdict(model_config), asdict(preprocess), resumable, backend, slices.case_names,
                               len(slices))  # fmt: skip
    checkpointer = Checkpointer(work / "checkpoint.pt", fingerprint, resume)

    def report(stage, step, total, info):
        if progress is not None:
            progress(stage, step, total, info)

    bundle.detector.fit(train_set, options, report, cancel or (lambda: False), checkpointer, dev)
    bundle.calibration = calibrate_on(bundle, val_set, max(1, len(val_ids)), dev)
    summary = {
        "cases": len(cases),
        "case_names": slices.case_names,
        "training_slices": len(train_set),
        "calibration_slices": len(val_set),
        "calibration_cases": [slices.case_names[i] for i in val_ids]
        or "slice-level split (too few cases to hold one out): every 4th block of 4 slices",
        "excluded_masked_slices": slices.excluded_slices,
        "options": asdict(options),
        "device": str(dev),
        "duration_s": round(time.time() - started, 1),
        "input": str(input_path),
    }
    save_bundle(bundle, output, training_summary=summary)
    (work / "checkpoint.pt").unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass
    return output


def recalibrate(bundle_path, input_path, output=None, target_rate: Optional[float] = None, device: str = "auto",
                log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Calibrate an existing bundle on new NORMAL data; writes the bundle in place or to `output`."""
    dev = select_device(device)
    bundle = load_bundle(bundle_path, device=dev)
    cases = discover_cases(input_path, "calibration input")
    slices = load_slices(cases, bundle.preprocess, bundle.model_config.image_size)
    log(f"Calibrating on {len(slices)} normal slices from {len(cases)} case(s) ...")
    bundle.calibration = calibrate_on(bundle, slices, len(cases), dev, target_rate)
    training = dict(bundle.metadata.get("training") or {})
    training["recalibrated_on"] = {"input": str(input_path), "cases": len(cases), "slices": len(slices)}
    return save_bundle(bundle, Path(output or bundle_path), training_summary=training)
