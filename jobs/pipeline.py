"""Run the SafetyDPO pipeline, stage after stage, under one MLflow parent run.

    python jobs/pipeline.py --config jobs/configs/toy.yaml [--stages a,b] [key.sub=value ...]

The stages are ``safetydpo.stages.STAGES``, in order. Joins a Ray cluster when one is configured
(``$RAY_ADDRESS``, set by ``ray job submit``) or when ``cluster/local.py up`` runs one here; otherwise
starts Ray in-process. Workers get the MLflow store and the parent run id through their environment.
"""

import sys

from safetydpo.commands import pipeline

if __name__ == "__main__":
    sys.exit(pipeline())
