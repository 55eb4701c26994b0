import logging
import os
import sys

# Distributed tests import their spawn harness by module name.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
logging.getLogger("shardema").setLevel(logging.INFO)
