import sys

from fastimds.cli import main

sys.exit(main())
