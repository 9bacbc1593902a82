import sys

from medusa_edge.cli import main

sys.exit(main())
