"""Make the top-level scripts (make_shapes_dataset.py, models.py, ...) importable from the tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
