"""The optimum-graphcore release whose API `optimum.graphcore` provides here.

Code written for optimum-graphcore checks it (`check_min_version("0.6.0.dev0")`); this project's own
version is `ipu_trainer`'s package metadata (`pip show ipu-trainer`).
"""

__version__ = "0.7.1"
