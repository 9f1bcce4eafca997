"""The paper's Table 1 from sweep folders: python src/report.py multirun/<date>/<time> [...] [--out DIR]."""

import sys

from allconv.report import main

if __name__ == "__main__":
    sys.exit(main())
