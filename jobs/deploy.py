"""Deploy the aligned model on Ray Serve, on a running cluster (the pipeline's last stage).

    python jobs/deploy.py --config jobs/configs/toy.yaml [--lora PATH | --mlflow-model NAME@ALIAS]
        [key.sub=value ...]

Joins ``$RAY_ADDRESS`` or the cluster of ``cluster/local.py up`` and ships this project as the
job's working dir, so the replicas can import ``serve.app``. See ``serve/deploy.py``.
"""

import sys

from serve.deploy import main

if __name__ == "__main__":
    sys.exit(main())
