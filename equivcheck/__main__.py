import sys

from equivcheck.cli import main

sys.exit(main())
