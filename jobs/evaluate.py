"""Ray job entry for ``jointray evaluate``: the same code path as the CLI.

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint runs/synthetic/best --data DATA --out runs/synthetic/eval
"""

import sys
from pathlib import Path

# Run the submitted working directory's code, also on nodes where jointray is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jointray.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
