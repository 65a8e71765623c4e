import sys

from fleet.asgi.worker import main
from fleet.worker.forkserver import worker_argv

raise SystemExit(main(worker_argv(sys.argv[1:])))
