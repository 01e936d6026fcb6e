"""Search the merge's settings with Ray Tune on the validation split; publish and register the champion.

    python jobs/tune_merge.py --config jobs/configs/toy.yaml [--num-samples N] [tune.methods=[comerge,ties] ...]

Trials merge the experts with one point of the ``tune`` section's space each, render the validation
split and report IP and quality; the champion (lowest IP within ``tune.quality_tolerance`` of the base's
quality) goes to ``merged/champion/`` and the MLflow registry (alias ``champion``), where Serve's
``merged`` model finds it. Logs the child run ``merge-search`` with one child run per trial.
"""

import sys

from safetydpo.commands import tune_merge

if __name__ == "__main__":
    sys.exit(tune_merge())
