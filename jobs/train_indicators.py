"""Joint indicator training on Ray Train (FP stage first when needed), logged to MLflow.

    python jobs/train_indicators.py --config jobs/configs/demo.yaml          # local Ray
    ray job submit --working-dir . -- python jobs/train_indicators.py --config jobs/configs/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's package

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["indicators", "train", *sys.argv[1:]]))
