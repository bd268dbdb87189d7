"""The whole pipeline: FP -> joint indicator training -> budget sweep (ILP + fine-tuning on Ray Tune).

    python jobs/pipeline.py --config jobs/configs/demo.yaml                  # local Ray
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's package

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
