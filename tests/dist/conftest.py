"""Make the helpers next to these tests (`multiproc`, `toymodel`) importable by plain name,
in this process and in the ranks it spawns, whatever pytest's import mode."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
