"""A ``gearoffload-worker`` child process: ``gearoffload.supervisor.child_main``.

A module of its own (not ``-m gearoffload.supervisor``) so that the supervisor is imported
once, under its own name, in the child.
"""

import sys

from gearoffload.supervisor import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
