"""Tables and figures from sweep folders.

python src/report.py multirun/<date>/<time> [...] [--out DIR]      the paper's Table 1 + bar chart
python src/report.py <sweep dir> --curves [--md FILE] [--png FILE]  one row and one learning curve per run
python src/report.py <sweep dir> --grid                             every (network, lr, cap) cell, dead ones marked
"""

import sys

from allconv.report import main

if __name__ == "__main__":
    sys.exit(main())
