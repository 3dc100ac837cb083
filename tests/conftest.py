"""Test configuration: the repository root on sys.path (tests run from a checkout too, as
`make test` does after an editable install) and the llmc-parity plugin's fixtures."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
