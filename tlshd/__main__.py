import sys

from tlshd.early import main

sys.exit(main())
