"""Ray job entry for ``jointray tune``: the same code path as the CLI.

    ray job submit --working-dir . -- python jobs/tune.py --config tune_synthetic
"""

import sys
from pathlib import Path

# Run the submitted working directory's code, also on nodes where jointray is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jointray.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
