"""`anomalyflag` under torchrun, with one training process killed (SIGKILL) after its N-th checkpoint.

torchrun ... Testing/killed_training.py N train ARGS...
"""

import os
import signal
import sys

from AnomalyFlagLib.cli import main
from AnomalyFlagLib.detectors import base

KILL_AFTER = int(sys.argv[1])
saved = base.TrainingRun._save
checkpoints = []


def save_then_die(self, *args, **kwargs):
    saved(self, *args, **kwargs)
    checkpoints.append(1)
    if len(checkpoints) == KILL_AFTER and self.parallel.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


base.TrainingRun._save = save_then_die
sys.exit(main(sys.argv[2:]))
