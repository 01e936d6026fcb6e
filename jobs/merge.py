"""Merge the finished experts into one safety LoRA with one method, no search (``merged/<method>/``).

    python jobs/merge.py --config jobs/configs/toy.yaml [--method comerge|average|sum|ties|dare_linear|dare_ties]
        [merge.scale=1.2 merge.granularity=row ...]

Reads ``<run_root>/experts/*/``; each method's settings are the config's ``merge`` section. A merge whose
``merge.json`` matches the experts and settings is reused. Logs the child run ``merge``.
"""

import sys

from safetydpo.commands import merge

if __name__ == "__main__":
    sys.exit(merge())
