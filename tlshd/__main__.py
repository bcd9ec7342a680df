import sys

from tlshd.cli import main

sys.exit(main())
