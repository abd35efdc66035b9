import sys

from gptrain.cli import main

sys.exit(main())
