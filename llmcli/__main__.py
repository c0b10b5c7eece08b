import sys

from llmcli.cli import main

sys.exit(main())
