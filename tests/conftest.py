"""Test configuration: the repository root on sys.path (tests run from a checkout too, as
`make test` does after an editable install) and the llmc-parity plugin's fixtures."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def edit_function(src: str, func: str, old: str, new: str, once: bool = False) -> str:
    """``src`` with ``old`` replaced by ``new`` inside the body of C function ``func`` (a
    planted edit); ``once``: ``old`` must occur there exactly once, else at least once."""
    m = re.search(rf"\n(void|float\*?|int) {func}\(", src)
    assert m, func
    start = src.index("{", m.end())
    end = src.index("\n}\n", start)
    body = src[start:end]
    if once:
        assert body.count(old) == 1, (func, old)
    else:
        assert old in body, (func, old)
    return src[:start] + body.replace(old, new) + src[end:]


def pristine_source() -> str:
    """Our train_gpt2.c as committed: the text the tests that plant edits in the C edit.
    The C under test (llmc/train_gpt2.c in the working tree, or a library built elsewhere)
    may differ from it textually while computing the same bits (a loop over Vp that adds
    exact zeros, say); a planted edit would then meet that change, and a test of the
    harness would fail for a reason that is not the harness's. Outside a git checkout (or
    without git) the file itself is the pristine copy."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:llmc/train_gpt2.c"], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return (ROOT / "llmc" / "train_gpt2.c").read_text()
