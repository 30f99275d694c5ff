"""Start the progress server: `python run.py --help` lists every flag and its variable."""

import sys

from server.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
