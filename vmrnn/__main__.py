import sys

from vmrnn.cli import main

sys.exit(main())
