import sys

from llmos.cli.main import main

sys.exit(main())
