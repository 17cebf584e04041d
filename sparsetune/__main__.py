import sys

from sparsetune.cli import main

sys.exit(main())
