"""Data-parallel training over the processes of a `torchrun` launch (one process alone: every call a no-op).

Each process trains on its share of the slices with its own random stream; before every optimiser step
the gradients of that optimiser's parameters are averaged over the processes (one all-reduce of a flat
buffer), so every process takes the same step from the same weights and the replicas never drift
apart. That is DistributedDataParallel's arithmetic, applied at the optimiser rather than by wrapping
the networks: the backends' GAN steps run several forwards and backwards per step through networks they
do not all step (the critic inside the generator's loss), which the DDP wrapper's reducer does not
follow without per-backend restructuring, whereas an optimiser step is the one point every backend
shares. Floating-point buffers (BatchNorm statistics), which no gradient reaches, are averaged at every
checkpoint and at the end of each stage. NCCL on CUDA, Gloo on the CPU.
"""

import hashlib
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from .errors import DeviceError
from .launcher import Launch


class DataParallel:
    def __init__(self, launch: Optional[Launch] = None, device: Optional[torch.device] = None):
        self.launch = launch or Launch()
        self.device = device or torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    def _dist(self):
        import torch.distributed as dist

        return dist

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def all_ok(self, ok: bool) -> bool:
        """Whether every process got here without an error (so that one failing process stops all,
        instead of leaving the others waiting in a collective until the timeout)."""
        if not self.distributed:
            return ok
        flag = self._tensor([float(ok)])
        self._dist().all_reduce(flag, op=self._dist().ReduceOp.MIN)
        return bool(flag[0] > 0)

    def total(self, value: float) -> float:
        """The sum of `value` over the processes."""
        return float(self.all_reduce_sum(self._tensor([value]))[0]) if self.distributed else value

    def maximum(self, value: float) -> float:
        """The largest `value` of the processes."""
        if not self.distributed:
            return value
        t = self._tensor([value])
        self._dist().all_reduce(t, op=self._dist().ReduceOp.MAX)
        return float(t[0])

    def share(self, n: int) -> torch.Tensor:
        """Indices of this process's share of n items (every world_size-th, from its rank)."""
        return torch.arange(self.rank, n, self.world_size)

    def agree(self, fraction: float, stop: bool, cancelled: bool):
        """(rank 0's training fraction, whether any process must stop, whether any was cancelled).

        Every process must stop at the same step and decay its learning rate alike, whatever its own
        clock says: rank 0's clock decides the schedule, and one process's budget or cancel stops all."""
        if not self.distributed:
            return fraction, stop, cancelled
        flags = self._tensor([fraction if self.rank == 0 else 0.0, float(stop), float(cancelled)])
        self._dist().all_reduce(flags, op=self._dist().ReduceOp.MAX)
        return float(flags[0]), bool(flags[1] > 0), bool(flags[2] > 0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place (statistics accumulated from each share)."""
        if self.distributed:
            moved = tensor.to(self.device)
            self._dist().all_reduce(moved)
            tensor.copy_(moved)
        return tensor

    def synchronise(self, networks: Dict[str, torch.nn.Module], optimizers: Dict[str, torch.optim.Optimizer]):
        """Start every process from rank 0's weights and average gradients before each optimiser step."""
        if not self.distributed:
            return
        dist = self._dist()
        for net in networks.values():
            for tensor in list(net.parameters()) + list(net.buffers()):
                dist.broadcast(tensor.data, src=0)
        for opt in optimizers.values():
            opt.register_step_pre_hook(self._average_gradients)

    def _average_gradients(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        _average(self._dist(), grads, self.world_size)

    def average_buffers(self, networks: Dict[str, torch.nn.Module]) -> None:
        """Average the floating-point buffers (running statistics), which gradients do not reach."""
        if self.distributed:
            buffers = [b for net in networks.values() for b in net.buffers() if b.is_floating_point()]
            _average(self._dist(), buffers, self.world_size)

    def gather_generator_states(self, generator: torch.Generator) -> List[torch.Tensor]:
        """Every process's random state (for a checkpoint from which each resumes its own stream)."""
        state = generator.get_state()
        if not self.distributed:
            return [state]
        # Gloo gathers CPU tensors; NCCL needs them on the GPU.
        local = state.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._dist().all_gather(gathered, local)
        return [s.cpu() for s in gathered]

    def weights_digests(self, networks: Dict[str, torch.nn.Module]) -> List[str]:
        """A digest of each process's weights and buffers (all equal when the replicas stayed in step)."""
        digest = weights_digest(networks)
        if not self.distributed:
            return [digest]
        gathered = [None] * self.world_size
        self._dist().all_gather_object(gathered, digest)
        return gathered


def _average(dist, tensors: Iterable[torch.Tensor], world_size: int) -> None:
    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def weights_digest(networks: Dict[str, torch.nn.Module]) -> str:
    """A short digest of the networks' weights and buffers (equal digests: bit-identical states)."""
    h = hashlib.sha256()
    for name in sorted(networks):
        for key, value in sorted(networks[name].state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[DataParallel]:
    """The processes of `launch` joined for training (NCCL on CUDA, Gloo otherwise); alone, no group."""
    if not launch.distributed:
        yield DataParallel(launch, device)
        return
    import torch.distributed as dist

    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"training under torchrun runs on CPUs (Gloo) or CUDA GPUs (NCCL), not on '{device}'; "
                          "use --device cpu or cuda.")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank,
                            world_size=launch.world_size)  # fmt: skip
    try:
        yield DataParallel(launch, device)
    finally:
        dist.destroy_process_group()
