import sys

from fastimds.cli.main import main

sys.exit(main())
