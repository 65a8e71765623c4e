import sys

from fleet.worker.forkserver import worker_argv
from fleet.worker.worker import main

raise SystemExit(main(worker_argv(sys.argv[1:])))
