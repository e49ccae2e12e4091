"""Dataflow Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): the template's parameters arrive as
flags. The job is submitted and not waited for: it writes its own card and `_RUN.json`, so a scheduler
watches for `{output}/_RUN.json` rather than for this process."""

import logging
import sys

from pipeline.launch.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(["--detach", *sys.argv[1:]])
