import sys

from bank_server.cli import main

sys.exit(main())
