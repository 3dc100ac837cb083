"""Build a ``train_gpt2.c`` into the shared library the harness binds.

One place for the compile command, used by ``make lib`` and by the harness itself when
it builds variants (``-O2``, ``-Ofast -march=native``, a user's source). Standard library
only, so ``make lib`` runs before any virtual environment exists.

The translation unit is ``llmc/abi_probe.c``, which ``#include``s the chosen source
unmodified and adds ``llmc_abi_layout`` (the struct layout as the compiler chose it).
Next to the library a ``.json`` file records what was built and how: the gate uses it
to know whether a committed bit fingerprint applies to this build.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import InputError

# the C sources ship inside the installed package (the `llmc` package's data), so these
# paths hold in a checkout and after a plain `pip install` alike
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SRC = ROOT / "llmc" / "train_gpt2.c"
PROBE = ROOT / "llmc" / "abi_probe.c"
# what `make lib` builds in a checkout (the Makefile hands it to everything as LLMC_LIB)
DEFAULT_LIB = ROOT / "build" / "libtrain_gpt2.so"
DEFAULT_CFLAGS = "-O3"
# the harness's own compiled helper (fused comparisons, the update check's float64 AdamW,
# the witness's noise): always these flags, whatever the library under test was built
# with, so that its arithmetic is the NumPy path's (no FMA contraction, no fast-math)
HELPER = ROOT / "llmc" / "fused_checks.c"
HELPER_CFLAGS = "-O3 -ffp-contract=off -fno-math-errno"


def build_dir() -> Path:
    """Where the harness builds libraries on its own (the default one on first use,
    ``--src`` builds): ``$LLMC_BUILD_DIR``, else a per-user cache directory
    (``$XDG_CACHE_HOME/llmc-parity``, ``~/.cache/llmc-parity``), never the installation."""
    if os.environ.get("LLMC_BUILD_DIR"):
        return Path(os.environ["LLMC_BUILD_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmc-parity"


def cached_library(src: str | os.PathLike | None = None, cflags: str = DEFAULT_CFLAGS,
                   cc: str | None = None, openmp: bool = True) -> Path:
    """The cache path of a build, keyed by what decides it: the source's and the probe's
    contents, the compiler and its version, the flags and OpenMP. A second call with the
    same key finds the library built; a changed source or flag gets a new one."""
    src = Path(src or DEFAULT_SRC).resolve()
    if not src.is_file():
        raise BuildError(f"C source {src} does not exist")
    cc = cc or os.environ.get("CC") or "gcc"
    key = "|".join([_sha256(src), _sha256(PROBE), compiler_version(cc), cflags, str(openmp)])
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = "train_gpt2" if src == DEFAULT_SRC else src.stem
    return build_dir() / f"lib{name}-{tag}.so"


def ensure_library(src: str | os.PathLike | None = None, cflags: str = DEFAULT_CFLAGS,
                   cc: str | None = None, openmp: bool = True) -> "BuildInfo":
    """Build ``src`` (default: our train_gpt2.c) into the cache unless it is there."""
    out = cached_library(src, cflags, cc, openmp)
    return build_library(src, out, cflags=cflags, cc=cc, openmp=openmp, quiet=True)


class BuildError(InputError, RuntimeError):
    """The library could not be built; the message says why and what to do."""


@dataclass
class BuildInfo:
    library: str
    source: str
    source_sha256: str
    cc: str
    cc_version: str
    cflags: str
    openmp: bool
    command: list[str]
    # the instruction sets these flags let the compiler use (see target_isa): -march=native
    # means different code on different machines, so the flags string alone does not say
    isa: str = ""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"C compiler {cc!r} not found or not working ({e}); set CC=") from None
    return out.stdout.splitlines()[0].strip()


# Predefined macros that name an instruction-set extension the compiler may emit code for.
_ISA_MACRO = re.compile(r"^#define __(SSE\w*|AVX\w*|FMA\w*|F16C|BMI2?|POPCNT|LZCNT|ARM_NEON|"
                        r"ARM_FEATURE_(?:FMA|SVE\w*|FP16\w*))__ ")


@functools.lru_cache(maxsize=None)
def target_isa(cc: str, cflags: str) -> str:
    """The instruction-set extensions ``cc`` targets under ``cflags`` (its predefined
    macros: ``-march=native`` resolves to the build machine's), e.g. ``"AVX AVX2 FMA SSE
    SSE2 ..."``; "" if the compiler cannot say. Asked once per process and pair."""
    try:
        out = subprocess.run([cc, *shlex.split(cflags), "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return " ".join(sorted({m.group(1) for line in out.splitlines() if (m := _ISA_MACRO.match(line))}))


def check_openmp(cc: str) -> None:
    """Compile and link a two-line OpenMP program; raise a clear error if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp_check.c"
        src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        proc = subprocess.run([cc, "-fopenmp", str(src), "-o", str(Path(tmp) / "omp_check")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"OpenMP is not available with {cc!r}: compiling a test program with -fopenmp failed:\n"
            f"{proc.stderr.strip()}\n"
            "Install the compiler's OpenMP runtime (e.g. Debian: apt-get install libgomp1 / "
            "libomp-dev for clang), or build without it: make lib NO_OMP=1")


def build_library(src: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                  cflags: str = DEFAULT_CFLAGS, cc: str | None = None, openmp: bool = True,
                  extra_ldflags: str = "", force: bool = False, quiet: bool = False) -> BuildInfo:
    """Compile ``src`` (default: our llmc/train_gpt2.c) into ``out`` and return what was built.

    Skips the compile when ``out`` and its record exist and match this source, compiler
    and flags. The library is written to a temporary name and renamed into place, so a
    process that has the old one loaded is never left with a half-written file.
    """
    src = Path(src or DEFAULT_SRC).resolve()
    out = Path(out or DEFAULT_LIB).resolve()
    cc = cc or os.environ.get("CC") or "gcc"
    if not src.is_file():
        raise BuildError(f"C source {src} does not exist")
    if src.suffix != ".c":
        raise BuildError(f"C source {src} is not a .c file")
    cc_version = compiler_version(cc)
    if openmp:
        check_openmp(cc)
    flags = shlex.split(cflags)
    cmd = [cc, *flags, "-fPIC", "-shared", "-DTESTING"]
    if openmp:
        cmd.append("-fopenmp")
    # the source's own folder goes on the include path: llm.c's original includes
    # "llmc/utils.h" and friends relative to its repository root
    cmd += [f"-I{src.parent}", f'-DLLMC_SOURCE="{src}"', str(PROBE),
            "-o", "OUT", "-lm", *shlex.split(extra_ldflags)]
    info = BuildInfo(library=str(out), source=str(src), source_sha256=_sha256(src), cc=cc,
                     cc_version=cc_version, cflags=" ".join(flags), openmp=openmp, command=cmd,
                     isa=target_isa(cc, cflags))
    record = out.with_suffix(out.suffix + ".json")
    if not force and out.is_file() and record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
        if old == asdict(info) and out.stat().st_mtime >= max(src.stat().st_mtime, PROBE.stat().st_mtime):
            return info
    _compile(cmd, src, out, quiet)
    record.write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def _compile(cmd: list[str], src: Path, out: Path, quiet: bool = True) -> None:
    """Run the compile command ``cmd`` (its output named "OUT") into a temporary file beside
    ``out``, then rename it into place: a process that has the old library loaded is never
    left with a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        real = [tmp if a == "OUT" else a for a in cmd]
        if not quiet:
            print(" ".join(shlex.quote(a) for a in real), file=sys.stderr)
        proc = subprocess.run(real, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"compiling {src} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_helper(cc: str | None = None) -> Path:
    """llmc/fused_checks.c built into the build cache unless it is there (keyed by its
    source, the compiler and its version, and HELPER_CFLAGS), with OpenMP where the compiler
    has it (else one thread). Raises BuildError when it cannot be built (the NumPy path
    then serves)."""
    cc = cc or os.environ.get("CC") or "gcc"
    key = "|".join([_sha256(HELPER), compiler_version(cc), HELPER_CFLAGS])
    out = build_dir() / f"libllmc_fused-{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
    if not out.is_file():
        cmd = [cc, *shlex.split(HELPER_CFLAGS), "-fPIC", "-shared", str(HELPER), "-o", "OUT", "-lm"]
        try:
            _compile([*cmd[:-3], "-fopenmp", *cmd[-3:]], HELPER, out)
        except BuildError:
            _compile(cmd, HELPER, out)
    return out


def read_build_info(library: str | os.PathLike) -> BuildInfo | None:
    """The record written beside a library we built, or None for a foreign library."""
    record = Path(str(library) + ".json")
    try:
        return BuildInfo(**json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.clib.build", description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="train_gpt2.c to build (default: llmc/train_gpt2.c)")
    ap.add_argument("--out", default=None, help="library to write (default: build/libtrain_gpt2.so)")
    ap.add_argument("--cflags", default=DEFAULT_CFLAGS)
    ap.add_argument("--cc", default=None)
    ap.add_argument("--no-openmp", action="store_true")
    ap.add_argument("--ldflags", default="")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out or DEFAULT_LIB)
    before = out.stat().st_mtime_ns if out.is_file() else None
    try:
        info = build_library(args.src, args.out, cflags=args.cflags, cc=args.cc,
                             openmp=not args.no_openmp, extra_ldflags=args.ldflags, force=args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fresh = before is None or Path(info.library).stat().st_mtime_ns != before
    print(f"{'built' if fresh else 'up to date:'} {info.library} from {info.source} "
          f"[{info.cflags}{' -fopenmp' if info.openmp else ''}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
