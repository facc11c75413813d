import sys

from p2pfed.cli import main

sys.exit(main())
