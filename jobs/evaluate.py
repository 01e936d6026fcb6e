"""Evaluate a model and its baselines on one benchmark: IP per category, quality, a report.

    python jobs/evaluate.py --config jobs/configs/toy.yaml --model base --benchmark toy
    python jobs/evaluate.py --config C --model merged|merged:<method>|expert:<category>|sld:<preset>|
        negative_prompt|<LoRA path>|mlflow:<name>/<ref>|runs:/<run id>/<path>|models:/<name>@<alias>
        --benchmark coprov2|i2p|ud|coco|toy [--prompts PATH] [--limit N] [key.sub=value ...]

Prints how many prompts it read, in total and per category (before ``--limit``), then renders and
classifies on Ray Data, and writes ``<run_root>/eval/<model>/<benchmark>/`` (images Parquet, per-image
scores, metrics.json, report.md, plots), logged to MLflow under the pipeline's parent run.
"""

import sys

from safetydpo.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
