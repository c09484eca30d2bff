"""Same as `vmrnn bench` (see vmrnn/bench.py), runnable without installing the package:

python benchmarks/bench.py --presets taxibj,kth --modes fast --check --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmrnn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
