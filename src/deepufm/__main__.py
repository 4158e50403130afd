import sys

from deepufm.cli import main

sys.exit(main())
