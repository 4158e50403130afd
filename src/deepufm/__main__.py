import sys

from deepufm.cli import main

# The guard keeps spawned worker processes (`run all --jobs`) from running the command again.
if __name__ == "__main__":
    sys.exit(main())
