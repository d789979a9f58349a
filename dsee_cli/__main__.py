import sys

from dsee_cli.cli import main

sys.exit(main())
