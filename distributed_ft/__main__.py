import sys

from distributed_ft.cli import main

sys.exit(main())
