"""`python -m yarn_vllm.cli ...`, the same as the `yarn-vllm` console script."""

import sys

from yarn_vllm.cli import main

sys.exit(main())
