import sys
from pathlib import Path

# Shared test helpers (tests/toydata.py, tests/fixtures_images.py) import as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))
