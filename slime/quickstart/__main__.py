import sys

from slime.quickstart.run import main

sys.exit(main(sys.argv[1:]))
