"""Render the preference pairs: both prompts of every pair, by the model being aligned (``pairs/``).

    python jobs/generate.py --config jobs/configs/toy.yaml [--skip-bad-rows] [key.sub=value ...]

Writes ``<run_root>/pairs/<fingerprint>/``: a finished dataset is reused, an interrupted one is
resumed. Logs the child run ``generate`` under the pipeline's MLflow parent run (a new parent when
run alone, or ``$SAFETYDPO_PARENT_RUN_ID``'s).
"""

import sys

from safetydpo.commands import generate

if __name__ == "__main__":
    sys.exit(generate())
