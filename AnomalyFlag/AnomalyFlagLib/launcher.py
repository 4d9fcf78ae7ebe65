"""Running under `torchrun`: which share of the cases this process scores, on which GPU, and a barrier.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) in each process's
environment; a plain run has none of them and is rank 0 of 1.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Launch":
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))  # fmt: skip
        except ValueError:
            return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> str:
        """One GPU per process: 'auto' and 'cuda' become cuda:LOCAL_RANK when CUDA is there."""
        if not self.distributed or requested not in ("auto", "cuda"):
            return requested
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else requested

    def barrier(self) -> None:
        """Wait until every process got here (Gloo over the rendezvous torchrun set up); no-op alone."""
        if not self.distributed:
            return
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size)
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
