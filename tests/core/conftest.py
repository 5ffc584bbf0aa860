import sys
from pathlib import Path

# tests/official_formula.py is a shared reference implementation (also used by bench/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
