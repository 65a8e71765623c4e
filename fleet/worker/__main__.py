import sys

from fleet.worker.worker import main

raise SystemExit(main(sys.argv[1:]))
