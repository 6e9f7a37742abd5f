"""Ray job entry for ``jointray train``: the same code path as the CLI.

    ray job submit --working-dir . -- python jobs/train.py --config synthetic train.workers=2
"""

import sys
from pathlib import Path

# Run the submitted working directory's code, also on nodes where jointray is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jointray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
