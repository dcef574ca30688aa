import sys

from tierdet.cli import main

sys.exit(main())
