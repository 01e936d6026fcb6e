"""Train the safety experts: one Diffusion-DPO LoRA per category, several at once on Ray.

    python jobs/train_experts.py --config jobs/configs/toy.yaml [--categories Hate Sexual all]
                                 [--pairs DIR] [key.sub=value ...]

Reads the config's ``<run_root>/pairs/<fingerprint>/`` (or ``--pairs``), writes
``<run_root>/experts/<category>/``; finished experts are skipped. Run standalone it opens its own
MLflow parent run (or joins ``$SAFETYDPO_PARENT_RUN_ID``); inside ``jobs/pipeline.py`` it is the
``experts`` stage.
"""

import sys

from safetydpo.commands import train_experts

if __name__ == "__main__":
    sys.exit(train_experts())
