import sys

from opt_ds.cli import main

sys.exit(main())
