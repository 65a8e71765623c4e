"""Fixed exit codes, so a supervisor (or systemd, or a script) can tell why a process ended."""

OK = 0
USAGE = 2  # a user mistake on the command line
BOOT_FAILED = 3  # a worker or master could not start (sockets, runtime dir)
APP_LOAD_FAILED = 4  # the WSGI application could not be imported
RESTART = 5  # a node's supervisor stopped to start again with a new configuration
CRASHED = 70  # an internal error killed one of a worker's threads (sysexits' EX_SOFTWARE)
