import sys

from slime.backends.cuda.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
