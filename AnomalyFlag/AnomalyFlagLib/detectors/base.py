"""The detector contract: what every backend declares and what it computes.

A backend owns its networks, its architecture and training-option dataclasses (stored in the bundle
under its own block), its score components and its training stages. Per batch of preprocessed slices it
returns one raw pixel map per component at model resolution; `maps.MapScorer` turns those maps into
the normalised anomaly map, the slice score and the per-component slice values, the same way for every
backend. Scoring, calibration, heatmaps, bundles, the command line and the Slicer module only see this
contract.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from ..data_parallel import DataParallel
from ..devices import autocast_for
from ..errors import CancelledError, OutputError
from ..preprocessing import InputSpec

ProgressFn = Callable[[str, int, int, Dict[str, float]], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class ScoreComponent:
    """A named pixel map of a backend: its CSV column, its description and its weight in the score.

    A `whole_slice` component is a term of the whole slice (a global reconstruction) rather than a map
    that points at a place: it is left out of the anomaly map, and its pooled value, scaled to the spread
    of the local score on held-out normal slices, is added to the slice score (see maps.MapScorer)."""

    name: str
    description: str
    weight: float = 1.0
    whole_slice: bool = False


@dataclass(frozen=True)
class TrainingStage:
    """One stage of a backend's training: `share` is its part of a time budget, `steps_option` the
    training option that holds its number of steps (so a budgeted run can be replayed step for step)."""

    name: str
    label: str
    share: float = 1.0
    steps_option: Optional[str] = None


@dataclass(frozen=True)
class TrainingInput:
    """A training input besides the normal scans, given as `--NAME FOLDER` and handed to `fit` as
    `data.extra[NAME]`. The known ones are `UNLABELLED` and `PATIENTS` (read by `training_slices`)."""

    name: str
    help: str


UNLABELLED = TrainingInput(
    "unlabelled", "folder of unlabelled scans (normal or not; masks beside them are ignored), e.g. the archive "
    "that `anomalyflag worklist` ranks"
)  # fmt: skip
PATIENTS = TrainingInput(
    "patients", "abnormal slices: a folder reviewed in AnomalyFlag (the slices decided 'abnormal'), or a folder of "
    "abnormal scans (with a <case>_anomaly/_label/_mask volume: its slices; without: every slice of the scan)"
)  # fmt: skip


@dataclass
class TrainingData:
    """Normal training slices: raw intensities (float16, (N, 1, S, S)) and relative positions (N,); `extra`
    holds the slices of the backend's other training inputs (see `TrainingInput`), by name."""

    images: torch.Tensor
    positions: torch.Tensor
    extra: Dict[str, "TrainingData"] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]


def option(default, help: str, flag: Optional[str] = None, added: bool = False, **kwargs):
    """A dataclass field that the command line offers as `--name` (or `flag`) with this help text; `added`:
    a field added after bundles were released, which bundles made before lack and load with its default."""
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if added:
        metadata["absent_in_older_bundles"] = True
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


class TrainingRun:
    """What a backend's `fit` gets besides the data: device, seeded random numbers, progress, cancel,
    checkpoints, the time budget and the data-parallel processes (`parallel`). `run_stage` drives one
    stage's loop, so every backend checkpoints, resumes, reports, keeps to the budget and trains on
    several processes the same way."""

    def __init__(
        self,
        device: torch.device,
        seed: int,
        checkpoint,
        progress: ProgressFn,
        cancel: CancelFn,
        deadline: Optional[float] = None,
        checkpoint_every: int = 200,
        parallel: Optional[DataParallel] = None,
    ):
        self.device = device
        self.parallel = parallel or DataParallel(device=device)
        # Each process its own random stream (rank 0's is a single process's).
        self.generator = torch.Generator().manual_seed(seed + self.parallel.rank)
        self.checkpoint = checkpoint
        self.progress = progress
        self.cancel = cancel
        self.deadline = deadline
        self.checkpoint_every = checkpoint_every
        self.stage_shares: Dict[str, float] = {}
        self.steps_done: Dict[str, int] = {}
        self._state: dict = {}
        self._networks: Dict[str, torch.nn.Module] = {}  # everything restored so far: what a checkpoint saves
        self._optimizers: Dict[str, torch.optim.Optimizer] = {}

    def autocast(self):
        """The mixed-precision context for a backend's forward passes in training (bfloat16 where the device
        has it, see devices.mixed_precision_dtype); losses are best taken in float32 outside or after it."""
        return autocast_for(self.device, training=True)

    def restore(self, networks: Dict[str, torch.nn.Module], optimizers: Dict[str, torch.optim.Optimizer]) -> None:
        """Load a resumed run's weights, optimiser states and random state (nothing when starting afresh);
        with several processes, start all from rank 0's weights and average gradients at every step.
        Called again (a composite backend's next member), it adds those networks to the run; the random
        state and the position come from the first call only."""
        first = not self._networks
        where = self.checkpoint.restore(networks, optimizers, self.generator if first else None, self.parallel.rank)
        if first:
            self._state = where
        self._networks.update(networks)
        self._optimizers.update(optimizers)
        self.parallel.synchronise(networks, optimizers)

    def run_stage(
        self,
        stage: TrainingStage,
        total_steps: int,
        step_fn: Callable[[int, float], Dict[str, float]],
        networks: Dict[str, torch.nn.Module],
        optimizers: Dict[str, torch.optim.Optimizer],
    ) -> None:
        """Call `step_fn(step, fraction)` until `total_steps`, the stage's share of the budget is used or
        the step reports `converged` (a backend's own stopping rule; one process's is enough for all).

        `fraction` in [0, 1) is how far the stage is (by steps or by time, whichever is further), for
        learning-rate schedules. A stage finished in a resumed run is skipped."""
        done_stages = self._state.get("done", [])
        if stage.name in done_stages:
            return
        step = int(self._state.get("step", 0)) if self._state.get("stage") == stage.name else 0
        spent = float(self._state.get("spent", 0.0)) if self._state.get("stage") == stage.name else 0.0
        allotted = self._allotted(stage)
        started = time.monotonic() - spent
        converged = False
        while step < total_steps:
            elapsed = time.monotonic() - started
            fraction = step / total_steps
            if allotted is not None:  # a stage left no time by the ones before it is over at once
                fraction = max(fraction, elapsed / allotted if allotted > 0 else 1.0)
            over = (allotted is not None and elapsed >= allotted) or converged
            cancelled = step > 0 and self.cancel()  # asked after each step, as the checkpoint below is
            fraction, over, cancelled = self.parallel.agree(fraction, over, cancelled)
            if cancelled:
                self._save(networks, optimizers, self._where(stage, step, started, done_stages))
                raise CancelledError(f"training cancelled at {stage.name} step {step}; resume with --resume")
            if over:
                break
            info = step_fn(step, min(fraction, 1.0))
            step += 1
            self.progress(stage.name, step, total_steps, info)
            if step % self.checkpoint_every == 0:
                self._save(networks, optimizers, self._where(stage, step, started, done_stages))
            converged = bool(info.get("converged"))
        if step < total_steps:  # stopped by the budget: the bar ends where the stage ended
            self.progress(stage.name, total_steps, total_steps, {"stopped_at_step": step})
        self.steps_done[stage.name] = step
        self._state = {"done": done_stages + [stage.name]}
        self._save(networks, optimizers, {"stage": stage.name, **self._state})

    @staticmethod
    def _where(stage: TrainingStage, step: int, started: float, done_stages) -> dict:
        return {"stage": stage.name, "step": step, "spent": time.monotonic() - started, "done": done_stages}

    def _save(self, networks, optimizers, where: dict) -> None:
        """A checkpoint of the replicas (buffers averaged), with every process's random state; rank 0 writes.

        No process returns before the file is on disk, so a process that dies after its save cannot take
        the write down with it; a failed write stops every process instead of leaving them waiting."""
        self.parallel.average_buffers(networks)
        states = self.parallel.gather_generator_states(self.generator)
        error = None
        if self.parallel.rank == 0:
            try:
                self.checkpoint.save({**self._networks, **networks}, {**self._optimizers, **optimizers}, states, where)
            except Exception as exc:  # every process must learn of it
                error = exc
        if not self.parallel.all_ok(error is None):
            raise error or OutputError("the first training process could not write the checkpoint; see its error.")

    def _allotted(self, stage: TrainingStage) -> Optional[float]:
        """Seconds this stage may use: its share of the time left, counting the stages still to run."""
        if self.deadline is None:
            return None
        done = set(self._state.get("done", []))
        remaining = [s for s in self.stage_shares if s not in done]
        total = sum(self.stage_shares[s] for s in remaining) or 1.0
        left = max(0.0, self.deadline - time.monotonic())
        spent = float(self._state.get("spent", 0.0)) if self._state.get("stage") == stage.name else 0.0
        return spent + left * self.stage_shares.get(stage.name, stage.share) / total


class DetectorBackend:
    """Base class of the backends. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Architecture: ClassVar[type]
    Options: ClassVar[type]
    components: ClassVar[Tuple[ScoreComponent, ...]]
    training_inputs: ClassVar[Tuple[TrainingInput, ...]] = ()  # needed besides the normal scans

    def __init__(self, architecture, inputs: InputSpec):
        self.architecture = architecture
        self.inputs = inputs

    @classmethod
    def tiny(cls) -> Tuple[object, object]:
        """(architecture, options) small enough to train in seconds on a CPU, for self-tests."""
        raise NotImplementedError

    @classmethod
    def validate(cls, architecture, inputs: InputSpec) -> None:
        """Raise ValueError when the architecture does not fit the inputs (called before building)."""

    def networks(self) -> Dict[str, torch.nn.Module]:
        """Named modules whose state makes up the bundle (one safetensors file each)."""
        raise NotImplementedError

    @classmethod
    def stages(cls, options) -> Sequence[TrainingStage]:
        raise NotImplementedError

    def fit(self, data: TrainingData, options, run: TrainingRun) -> None:
        """Train on normal slices only."""
        raise NotImplementedError

    def maps(self, x: torch.Tensor, pos: torch.Tensor, body: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw pixel maps (n, S, S), larger = more anomalous, one per component, for raw-intensity slices
        x (n, 1, S, S), relative positions pos (n,) and body masks (n, 1, S, S)."""
        raise NotImplementedError

    def to(self, device) -> "DetectorBackend":
        for net in self.networks().values():
            net.to(device)
        return self

    def eval(self) -> "DetectorBackend":
        for net in self.networks().values():
            net.eval()
        return self

    def train_mode(self) -> "DetectorBackend":
        for net in self.networks().values():
            net.train()
        return self
