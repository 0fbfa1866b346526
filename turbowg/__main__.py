import sys

from turbowg.cli import main

sys.exit(main())
