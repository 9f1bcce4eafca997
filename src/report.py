"""Tables and figures from sweep folders.

python src/report.py multirun/<date>/<time> [...] [--out DIR]      the paper's Table 1 + bar chart
python src/report.py <sweep dir> --curves [--md FILE] [--png FILE]  one row and one learning curve per run
"""

import sys

from allconv import cli
from allconv.report import main

if __name__ == "__main__":
    cli.setup()
    with cli.one_line_usage_errors():
        sys.exit(main())
