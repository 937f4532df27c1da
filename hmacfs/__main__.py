"""`python -m hmacfs` (and the zipapp's entry point)."""
import sys

from hmacfs.cli import main

if __name__ == "__main__":
    sys.exit(main())
