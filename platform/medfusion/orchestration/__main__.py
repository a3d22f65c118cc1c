"""``python -m medfusion.orchestration STAGE --config-b64 ... --result-uri ...``: what a remote stage runs."""

import sys

from medfusion.orchestration.stages import main

sys.exit(main())
