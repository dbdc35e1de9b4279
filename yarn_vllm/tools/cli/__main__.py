"""`python -m yarn_vllm.tools.cli ...`, the same as the `yarn-vllm` console script."""

import sys

from yarn_vllm.tools.cli import main

sys.exit(main())
