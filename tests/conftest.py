import sys
from pathlib import Path

# tests/ holds shared test helpers (e.g. fma_reference.py) imported as plain modules
sys.path.insert(0, str(Path(__file__).parent))
