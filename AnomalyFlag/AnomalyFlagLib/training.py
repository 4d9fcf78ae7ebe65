"""Training a detector on normal scans and calibrating it on held-out normal slices."""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .atomic_files import atomic_path
from .bundle import Bundle, load_bundle, new_bundle, save_bundle
from .calibration import Calibration, OrganCalibration, calibrate, robust
from .config import PreprocessConfig, ScoreConfig
from .data_parallel import DataParallel, process_group
from .detectors import DEFAULT_BACKEND, TrainingData, TrainingRun, backend_class
from .devices import autocast_for, precision_name, select_device
from .errors import InputError
from .io.cases import discover_cases
from .launcher import Launch
from .maps import MapStatisticsAccumulator, neighbour_max
from .preprocessing import InputSpec
from .training_slices import (
    VALIDATION_FRACTION,
    SliceSet,
    load_slices,
    load_training_input,
    split_cases,
    split_slices,
)

MAX_CALIBRATION_PIXELS = 400_000
MIN_TRAINING_SLICES = 8
MIN_CALIBRATION_SLICES = 20
CALIBRATION_BATCH = 32
STATISTICS_SIGMA_PX = 2.0  # in-plane smoothing of the normal map statistics
RESUMABLE = ("max_minutes", "checkpoint_every")  # may change on resume; everything else must match


class Checkpointer:
    """Saves and restores training state with torch.save / torch.load(weights_only=True): the weights and
    optimiser states (the same on every process) and each process's random state."""

    def __init__(self, path: Path, fingerprint: str, resume: bool, world_size: int = 1):
        self.path = path
        self.fingerprint = fingerprint
        self.resume = resume
        self.world_size = world_size
        self._loaded: Optional[dict] = None  # read once, by position() or restore()

    def position(self) -> dict:
        """Where a resumed run will start ({stage, step, spent, done}); {} when starting afresh."""
        state = self._load()
        return dict(state["where"]) if state else {}

    def _load(self) -> Optional[dict]:
        if self._loaded is None and self.resume and self.path.is_file():
            self._loaded = self._read()
        return self._loaded

    def _read(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling refusal or damage
            raise InputError(f"checkpoint '{self.path}' cannot be resumed: {exc}") from None
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"checkpoint '{self.path}' was made with other settings or data; delete it or train without --resume."
            )
        made_by = len(state.get("rng_processes") or [state["rng"]])
        if made_by != self.world_size:
            raise InputError(
                f"checkpoint '{self.path}' was made by {made_by} training process(es), this run has "
                f"{self.world_size}; resume with the same number (torchrun --nproc-per-node)."
            )
        return state

    def restore(self, networks, optimizers, generator: Optional[torch.Generator], rank: int = 0) -> dict:
        """Load the saved state of these networks and optimisers (and, given one, of this process's random
        generator); returns the saved position ({stage, step, spent, done}), or {} when starting afresh.

        A composite backend restores its members one by one: a name the checkpoint does not hold is a
        member that had not started training when it was written, and keeps its initial state."""
        state = self._load()
        if state is None:
            return {}
        for name, net in networks.items():
            if name in state["networks"]:  # popped: the tensors now live in the network
                net.load_state_dict(state["networks"].pop(name))
        for name, opt in optimizers.items():
            if name in state["optimizers"]:
                opt.load_state_dict(state["optimizers"].pop(name))
        if generator is not None:
            generator.set_state((state.get("rng_processes") or [state["rng"]])[rank])
        return dict(state["where"])

    def save(self, networks, optimizers, generator_states: List[torch.Tensor], where: dict) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "networks": {k: v.state_dict() for k, v in networks.items()},
            "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
            "rng": generator_states[0],
            "where": where,
        }
        if len(generator_states) > 1:
            state["rng_processes"] = list(generator_states)
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def _folds(slices: SliceSet) -> List[torch.Tensor]:
    """Two disjoint halves of the held-out slices: by case when there are two or more, else by blocks."""
    cases = torch.unique(slices.case_index)
    if len(cases) >= 2:
        first = torch.isin(slices.case_index, cases[::2])
    else:
        first = (torch.arange(len(slices)) // 4) % 2 == 0
    return [first, ~first]


@torch.no_grad()
def calibrate_on(bundle: Bundle, slices: SliceSet, num_cases: int, device, target_rate: Optional[float] = None,
                 roi_labels=None, roi_margin_mm: float = 10.0, log: Callable[[str], None] = print):  # fmt: skip
    """Fit the normal map statistics and the slice calibration on held-out NORMAL slices (in place); where
    slices carry their segmentation (`slices.regions`), also the organ-aware calibration of the score
    inside it (see calibration.OrganCalibration), else the bundle keeps none.

    Two-fold cross-fitting: each half is scored with statistics from the other half, so the calibration
    sees scores of slices the statistics never saw (as new scans will be); the bundle keeps the
    statistics of all held-out slices. Per-pixel statistics need two or more cases; from one they are
    one mean and scale per component."""
    if target_rate is not None:
        bundle.scoring.target_false_flag_rate = float(target_rate)
    try:
        bundle.scoring.validate()
    except ValueError as exc:
        raise InputError(f"cannot calibrate: {exc}.") from None
    raw, body = raw_maps(bundle, slices, device)
    return calibrate_from_maps(bundle, slices, raw, body, num_cases, device, roi_labels, roi_margin_mm, log)


@torch.no_grad()
def raw_maps(bundle: Bundle, slices: SliceSet, device):
    """The backend's raw component maps of `slices` ({name: (N, S, S) float16}, on the CPU) and their body
    masks ((N, 1, S, S) bool)."""
    spec = InputSpec.from_config(bundle.preprocess)
    names = [c.name for c in bundle.components]
    raw, bodies = {name: [] for name in names}, []
    for k0 in range(0, len(slices), CALIBRATION_BATCH):
        x = slices.images[k0 : k0 + CALIBRATION_BATCH].float().to(device)
        pos = slices.positions[k0 : k0 + CALIBRATION_BATCH].to(device)
        inside = spec.body(x)
        with autocast_for(device):
            maps = bundle.backend.maps(x, pos, inside)
        for name in names:
            raw[name].append(maps[name].float().cpu().half())
        bodies.append(inside.cpu())
    return {name: torch.cat(v) for name, v in raw.items()}, torch.cat(bodies)


@torch.no_grad()
def calibrate_from_maps(bundle: Bundle, slices: SliceSet, raw, body, num_cases: int, device, roi_labels=None,
                        roi_margin_mm: float = 10.0, log: Callable[[str], None] = print):  # fmt: skip
    """`calibrate_on` once the held-out slices' raw maps and body masks (`raw_maps`) are computed."""
    sc = bundle.scoring
    names = [c.name for c in bundle.components]
    whole = [c.name for c in bundle.components if c.whole_slice]
    size = bundle.preprocess.image_size
    per_pixel = len(torch.unique(slices.case_index)) >= 2

    def statistics(keep: torch.Tensor):
        acc = MapStatisticsAccumulator(names, sc.position_bins, size, whole)
        kept = torch.nonzero(keep).flatten()
        for k0 in range(0, len(kept), 256):
            idx = kept[k0 : k0 + 256]
            acc.add({n: raw[n][idx].float() for n in names}, slices.positions[idx], body[idx])
        return acc.finish(sc.pixel_floor, STATISTICS_SIGMA_PX, per_pixel)

    scores = torch.zeros(len(slices))  # of the map alone: the whole-slice terms are added below
    whole_values = torch.zeros(len(whole), len(slices))
    organ_scores = torch.full((len(slices),), float("nan"))
    pixels = []
    budget = max(1, MAX_CALIBRATION_PIXELS // max(1, (len(slices) + 255) // 256))
    gen = torch.Generator().manual_seed(0)
    folds = _folds(slices)
    for fit_on, apply_to in zip(folds, folds[::-1]):
        if not fit_on.any() or not apply_to.any():
            fit_on = apply_to = torch.ones(len(slices), dtype=torch.bool)  # too few slices to split
        bundle.statistics = statistics(fit_on).to(device)
        if whole:
            bundle.statistics.slice_weight.zero_()
        scorer = bundle.map_scorer()
        idx_all = torch.nonzero(apply_to).flatten()
        for k0 in range(0, len(idx_all), 256):
            idx = idx_all[k0 : k0 + 256]
            maps = {n: raw[n][idx].float().to(device) for n in names}
            s = scorer(maps, slices.positions[idx].to(device), body[idx].to(device))
            scores[idx] = s.score.float().cpu()
            for k, name in enumerate(whole):
                whole_values[k, idx] = s.components[name].float().cpu()
            if slices.regions is not None:
                region = slices.regions[idx].to(device)
                organ = scorer.pool(s.pixel_map.float() * region[:, 0]).cpu()
                organ_scores[idx] = torch.where(region.flatten(1).any(dim=1).cpu(), organ, organ_scores[idx])
            inside = s.pixel_map.float().cpu()[body[idx][:, 0]]
            if inside.numel() > budget:
                inside = inside[torch.randperm(inside.numel(), generator=gen)[:budget]]
            pixels.append(inside)
    bundle.statistics = statistics(torch.ones(len(slices), dtype=torch.bool)).to(device)
    if whole:
        spread = [max(robust(v.numpy())[1], 1e-6) for v in whole_values]
        bundle.statistics.slice_weight.copy_(torch.tensor([robust(scores.numpy())[1] / v for v in spread]))
        terms = bundle.map_scorer().whole_slice_terms(dict(zip(whole, whole_values.to(device))))
        scores = scores + terms.float().cpu()
    context, _ = neighbour_max(scores.numpy(), slices.case_index.numpy(), slices.slice_index.numpy(),
                               sc.neighbour_slices)  # fmt: skip
    pixel_values = torch.cat(pixels).numpy()

    case_index = slices.case_index.numpy()

    def fit(slice_scores, positions, cases, case_of):
        return calibrate(slice_scores, positions, pixel_values, num_cases=cases, position_bins=sc.calibration_bins,
                         target_false_flag_rate=sc.target_false_flag_rate,
                         pixel_false_positive_rate=sc.pixel_false_positive_rate,
                         case_index=case_of if sc.relative_to_scan else None)  # fmt: skip

    bundle.calibration = fit(context, slices.positions.numpy(), num_cases, case_index)
    bundle.organ_calibration = None
    inside = torch.isfinite(organ_scores).numpy()
    if inside.sum() >= MIN_CALIBRATION_SLICES:
        organ_context, _ = neighbour_max(organ_scores.numpy()[inside], case_index[inside],
                                         slices.slice_index.numpy()[inside], sc.neighbour_slices)  # fmt: skip
        organ = fit(organ_context, slices.positions.numpy()[inside], len(np.unique(case_index[inside])),
                    case_index[inside])  # fmt: skip
        bundle.organ_calibration = OrganCalibration.from_calibration(organ, roi_labels, roi_margin_mm)
    elif inside.any():
        log(f"Warning: only {int(inside.sum())} held-out slices show their segmentation (at least "
            f"{MIN_CALIBRATION_SLICES} are needed); the model gets no organ-aware calibration.")  # fmt: skip
    return bundle.calibration


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _calibration_seconds(bundle: Bundle, slices: SliceSet, device) -> float:
    """Time the held-out calibration will take, from one timed batch (reserved out of a time budget)."""
    x = slices.images[:CALIBRATION_BATCH].float().to(device)
    pos = slices.positions[:CALIBRATION_BATCH].to(device)
    spec = InputSpec.from_config(bundle.preprocess)
    started = time.monotonic()
    with torch.no_grad(), autocast_for(device):
        bundle.backend.maps(x, pos, spec.body(x))
    per_slice = (time.monotonic() - started) / max(1, x.shape[0])
    return 1.5 * per_slice * len(slices) + 5.0


def train(
    input_path,
    output,
    backend: str = DEFAULT_BACKEND,
    architecture=None,
    options=None,
    preprocess: PreprocessConfig = None,
    scoring: ScoreConfig = None,
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = 0,
    max_minutes: Optional[float] = None,
    checkpoint_every: int = 200,
    resume: bool = False,
    device: str = "auto",
    progress: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
    log: Callable[[str], None] = print,
    roi_labels=None,
    roi_margin_mm: float = 10.0,
    extra_inputs: Optional[Dict[str, object]] = None,
) -> Optional[Path]:
    """Train `backend` on the normal volumes at `input_path`, calibrate on held-out normal slices, save a bundle.

    `extra_inputs` {name: folder} gives the backend's other training inputs (its `training_inputs`, e.g.
    unlabelled scans or confirmed abnormal slices); every process reads all of them. Calibration is on
    normal slices only, for every backend.

    With `max_minutes` every stage gets its share of the time left after loading and before calibration,
    so the whole run, calibration included, ends within about that time (the number of steps then depends
    on the machine's speed; without it the run is repeatable bit for bit on the CPU). Cases with a
    segmentation beside them (`<case>_seg.*`) also give the organ-aware calibration, of `roi_labels` plus
    `roi_margin_mm` (see `calibrate_on`).

    Under `torchrun` every process trains on its share of the slices (see `data_parallel`); rank 0
    calibrates and writes the bundle and returns its path, the others return None."""
    started = time.monotonic()
    cls = backend_class(backend)
    architecture = architecture or cls.Architecture()
    options = options or cls.Options()
    preprocess = preprocess or PreprocessConfig()
    scoring = scoring or ScoreConfig()
    if max_minutes is not None and not max_minutes > 0:
        raise InputError(f"--max-minutes must be positive, not {max_minutes}.")
    output = Path(output)
    launch = Launch.from_environment()
    dev = select_device(launch.device(device))
    if launch.rank > 0:  # rank 0 speaks for all
        log, progress = (lambda message: None), None
    torch.manual_seed(seed)  # before the networks are built: their initial weights come from it
    np.random.seed(seed)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        bundle = new_bundle(backend, architecture, options, preprocess, scoring, name=output.name)
    except ValueError as exc:
        raise InputError(f"cannot train backend '{backend}': {exc}") from None
    extra_inputs = _check_extra_inputs(cls, extra_inputs or {})
    cases = discover_cases(input_path)
    log(f"Loading {len(cases)} case(s) from {input_path} ...")
    with process_group(launch, dev) as parallel:
        share = _training_share(cases, validation_fraction, seed, preprocess, parallel, cancel, log,
                                roi_labels=roi_labels, roi_margin_mm=roi_margin_mm)  # fmt: skip
        train_set, val_set = share.train, share.held_out
        extra = {}
        for name, folder in extra_inputs.items():
            extra[name] = load_training_input(name, folder, preprocess, cancel)
            log(f"{len(extra[name])} slices of {len(extra[name].case_names)} case(s) from --{name} {folder}.")
        log(
            f"{share.training_slices} training slices, {share.held_out_slices} held-out normal slices for "
            f"calibration, {share.excluded_slices} masked slices excluded; backend '{backend}'"
            + (f", {parallel.world_size} training processes." if parallel.distributed else ".")
        )
        bundle.backend.to(dev)
        work = output.with_name(output.name + ".partial")
        if parallel.rank == 0:
            work.mkdir(parents=True, exist_ok=True)
        run_settings = {"seed": seed, "validation_fraction": validation_fraction}
        extra_summary = {name: [len(v), v.case_names] for name, v in extra.items()}
        fingerprint = _fingerprint(backend, asdict(architecture), asdict(options), asdict(preprocess), run_settings,
                                   [c.name for c in cases], share.slices, extra_summary)  # fmt: skip
        checkpointer = Checkpointer(work / "checkpoint.pt", fingerprint, resume, parallel.world_size)
        where = checkpointer.position()
        if where:
            log(f"Resuming from the checkpoint: stage '{where.get('stage')}', step {where.get('step', 'end')}.")
        deadline = None
        if max_minutes is not None and val_set is not None:  # rank 0's clock decides for all
            deadline = started + 60.0 * max_minutes - _calibration_seconds(bundle, val_set, dev)
        run = TrainingRun(dev, seed, checkpointer, progress or (lambda *a: None), cancel or (lambda: False),
                          deadline, checkpoint_every, parallel)  # fmt: skip
        run.stage_shares = {s.name: s.share for s in bundle.backend.stages(options)}
        train_started = time.monotonic()
        extra_data = {name: TrainingData(v.images, v.positions) for name, v in extra.items()}
        bundle.backend.fit(TrainingData(train_set.images, train_set.positions, extra_data), options, run)
        bundle.backend.eval()
        train_seconds = time.monotonic() - train_started
        digests = parallel.weights_digests(bundle.backend.networks())
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {len(digests)} training processes ended with different weights ({digests}); "
                           "the bundle is not written.")  # fmt: skip
    if val_set is None:  # not rank 0: it calibrates and writes
        return None
    calibrate_on(bundle, val_set, share.held_out_cases, dev, roi_labels=roi_labels, roi_margin_mm=roi_margin_mm,
                 log=log)  # fmt: skip
    summary = {
        "backend": backend,
        "cases": len(cases),
        "case_names": [c.name for c in cases],
        "training_slices": share.training_slices,
        "calibration_slices": len(val_set),
        "calibration_cases": share.held_out_names
        or "slice-level split (too few cases to hold one out): blocks of 4 slices",
        "excluded_masked_slices": share.excluded_slices,
        "segmented_cases": [c.name for c in cases if c.segmentation is not None],
        "extra_inputs": {
            name: {"folder": str(extra_inputs[name]), "slices": n, "cases": names}
            for name, (n, names) in extra_summary.items()
        },
        "seed": seed,
        "max_minutes": max_minutes,
        "steps": run.steps_done,
        "device": str(dev),
        "precision": {"training": precision_name(dev, training=True), "calibration": precision_name(dev)},
        "processes": parallel.world_size,
        "weights_digests": digests,
        "training_s": round(train_seconds, 1),
        "duration_s": round(time.monotonic() - started, 1),
        "input": str(input_path),
    }
    save_bundle(bundle, output, training_summary=summary)
    (work / "checkpoint.pt").unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass
    return output


def _check_extra_inputs(cls, given: Dict[str, object]) -> Dict[str, object]:
    """The backend's training inputs from `given`, each needed one present and none that it does not take."""
    needed = {t.name for t in cls.training_inputs}
    missing = sorted(needed - set(given))
    if missing:
        raise InputError(f"backend '{cls.name}' also trains on {', '.join('--' + m for m in missing)} "
                         f"({'; '.join(t.help for t in cls.training_inputs if t.name in missing)}).")  # fmt: skip
    unused = sorted(set(given) - needed)
    if unused:
        raise InputError(f"backend '{cls.name}' does not take {', '.join('--' + u for u in unused)}.")
    return {name: given[name] for name in sorted(needed)}


@dataclass
class _Share:
    """One training process's slices: its share of the training slices, and on rank 0 the held-out ones
    (None elsewhere); counts are totals over the processes."""

    train: SliceSet
    held_out: Optional[SliceSet]
    held_out_names: List[str]
    slices: int
    training_slices: int
    held_out_slices: int
    excluded_slices: int

    @property
    def held_out_cases(self) -> int:
        return max(1, len(self.held_out_names))


def _training_share(cases, validation_fraction, seed, preprocess, parallel: DataParallel, cancel, log,
                    **load) -> _Share:  # fmt: skip
    """Split the cases into training and held-out ones (never sharing a case) and read this process's
    share: every N-th training case, or, with fewer training cases than processes, every N-th slice."""
    rank, world = parallel.rank, parallel.world_size
    train_ids, val_ids = split_cases(len(cases), validation_fraction, seed)
    by_case = bool(val_ids) and len(train_ids) >= world
    error = None
    try:
        if val_ids:
            mine = train_ids[rank::world] if by_case else train_ids
            read = mine + (val_ids if rank == 0 else [])
            slices = load_slices([cases[i] for i in read], preprocess, cancel=cancel, **load)
            train_set = slices.subset(list(range(len(mine))))
            held_out = slices.subset(list(range(len(mine), len(read))))
        else:
            slices = load_slices(cases, preprocess, cancel=cancel, **load)
            train_set, held_out = split_slices(slices, MIN_CALIBRATION_SLICES)
            log(
                f"Warning: {len(cases)} case(s) are too few to hold one out; calibrating on {len(held_out)} "
                "slices (blocks of 4) of the same patient(s). The false-flag rate on new patients may exceed "
                "the target."
            )
    except Exception as exc:  # every process must learn of it, or the others would wait in a collective
        error = exc
    if not parallel.all_ok(error is None):
        raise error or InputError("another training process could not read its share of the data; see its error.")
    # Shares of cases add up; otherwise rank 0 read a superset of what every other process read.
    combine = parallel.total if by_case else parallel.maximum
    total, training, excluded = (int(combine(n)) for n in (len(slices), len(train_set), slices.excluded_slices))
    held_out_slices = int(parallel.maximum(len(held_out) if rank == 0 else 0))
    if training < MIN_TRAINING_SLICES or held_out_slices < MIN_CALIBRATION_SLICES:
        raise InputError(
            f"too few normal slices to train and calibrate ({training} training, {held_out_slices} held out); "
            f"at least {MIN_TRAINING_SLICES} and {MIN_CALIBRATION_SLICES} are needed."
        )
    if not by_case:
        train_set = train_set.select(torch.isin(torch.arange(len(train_set)), parallel.share(len(train_set))))
    return _Share(train_set, held_out if rank == 0 else None, [cases[i].name for i in val_ids], total, training,
                  held_out_slices, excluded)  # fmt: skip


def recalibrate(bundle_path, input_path, output=None, target_rate: Optional[float] = None, device: str = "auto",
                log: Callable[[str], None] = print, roi_labels=None, roi_margin_mm: float = 10.0) -> Path:  # fmt: skip
    """Calibrate an existing bundle on new NORMAL data (organ-aware too where cases have segmentations);
    writes the bundle in place or to `output`."""
    dev = select_device(device)
    bundle = load_bundle(bundle_path, device=dev)
    cases = discover_cases(input_path, "calibration input")
    slices = load_slices(cases, bundle.preprocess, roi_labels=roi_labels, roi_margin_mm=roi_margin_mm)
    if len(slices) < MIN_CALIBRATION_SLICES:
        raise InputError(f"calibration needs at least {MIN_CALIBRATION_SLICES} normal slices, got {len(slices)}.")
    log(f"Calibrating on {len(slices)} normal slices from {len(cases)} case(s) ...")
    calibrate_on(bundle, slices, len(cases), dev, target_rate, roi_labels, roi_margin_mm, log)
    training = dict(bundle.metadata.get("training") or {})
    training["recalibrated_on"] = {"input": str(input_path), "cases": len(cases), "slices": len(slices)}
    return save_bundle(bundle, Path(output or bundle_path), training_summary=training)


def recalibrate_held_out(
    bundle_path,
    input_path,
    output=None,
    target_rate: Optional[float] = None,
    validation_fraction: float = VALIDATION_FRACTION,
    device: str = "auto",
    log: Callable[[str], None] = print,
    roi_labels=None,
    roi_margin_mm: float = 10.0,
) -> Path:
    """Calibrate a bundle again, with this version's flag rule, on the held-out normal slices it was trained
    beside: `input_path` is its training input, split again as `train` split it (its seed and
    `validation_fraction`). Writes the bundle in place or to `output`. A calibration change applied to a
    trained model without retraining it; an input or split other than the model's own is refused."""
    dev = select_device(device)
    bundle = load_bundle(bundle_path, device=dev)
    summary = dict(bundle.metadata.get("training") or {})
    cases = discover_cases(input_path, "training input")
    if [c.name for c in cases] != summary.get("case_names"):
        raise InputError(f"{input_path} is not the training input of {bundle_path}: it holds other cases.")
    share = _training_share(cases, validation_fraction, summary.get("seed", 0), bundle.preprocess, DataParallel(),
                            None, log, roi_labels=roi_labels, roi_margin_mm=roi_margin_mm)  # fmt: skip
    recorded = summary.get("calibration_cases")
    if len(share.held_out) != summary.get("calibration_slices") or (share.held_out_names or recorded) != recorded:
        raise InputError(f"{bundle_path} was calibrated on other held-out slices than a validation fraction of "
                         f"{validation_fraction} gives ({recorded}).")  # fmt: skip
    for f in fields(ScoreConfig):  # what bundles made before a rule lack is this version's default
        if "older_value" in f.metadata:
            setattr(bundle.scoring, f.name, f.default)
    calibrate_on(bundle, share.held_out, share.held_out_cases, dev, target_rate, roi_labels, roi_margin_mm, log)
    summary["recalibrated_on"] = {"input": str(input_path), "held_out_of_training": True, "slices": len(share.held_out)}
    return save_bundle(bundle, Path(output or bundle_path), training_summary=summary)


__all__ = ["Calibration", "Checkpointer", "calibrate_on", "recalibrate", "recalibrate_held_out", "train"]
