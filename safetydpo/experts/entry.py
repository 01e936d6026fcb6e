"""The Ray Train worker's entry point, in a module that imports nothing heavy.

Ray's Tune trial and Train controller processes unpickle the train function by reference, which imports its
module; importing the recipe itself (diffusers, transformers, peft: ~8 s on an idle 2-core machine, more while
experts train beside it) in every one of them made each round of experts wait ~45 s before its first step.
"""

from __future__ import annotations

import os
from typing import Any

TRAIN = "train"  # the Ray Train dataset of the expert's pairs
BENIGN = "benign"  # the Ray Train dataset of the preservation term


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: DPO-train one expert's LoRA, checkpointing and resuming through Ray Train."""
    os.environ.update(loop_config["env"])
    from safetydpo.experts.worker import ExpertRecipe  # the worker alone needs the model stack

    ExpertRecipe(loop_config).run()
