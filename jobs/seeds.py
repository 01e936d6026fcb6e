"""Train and evaluate one config under several training seeds; report each headline figure's spread.

    python jobs/seeds.py --config jobs/configs/toy.yaml --seeds 0 1 2
    python jobs/seeds.py --config C --seeds 0 1 2 --stages generate,experts,merge-search,merge-distill,evaluate

The config's own seed is its run root's run (reused when finished); seed s runs in <run_root>/seeds/seed-<s>.
Writes <run_root>/seeds/<benchmark>_spread.md and .csv: each figure per seed, mean, sd, min, max.
"""

import sys

from safetydpo.commands import seeds

if __name__ == "__main__":
    sys.exit(seeds())
