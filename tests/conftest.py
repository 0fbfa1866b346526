import os
import sys

# Tests import helpers such as tests/netns.py by plain module name.
sys.path.insert(0, os.path.dirname(__file__))
