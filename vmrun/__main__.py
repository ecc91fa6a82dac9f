import sys

from vmrun.cli import main

sys.exit(main())
