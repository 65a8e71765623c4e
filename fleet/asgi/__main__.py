import sys

from fleet.asgi.worker import main

raise SystemExit(main(sys.argv[1:]))
