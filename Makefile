# llmc-parity: build the C reference, set up the Python side, run the checks.
#   make parity    C vs Python references on the built-in tiny model, per step
#   make test      the fast test suite (creates .venv and builds the library first): every
#                  test but those marked slow; SLOW=1 runs those too
#   make test-slow the slow tests alone (long statistics, many processes, variant builds,
#                  a wheel install): CI (.ci/run) runs them after make test
#   make lib       build/libtrain_gpt2.so; LLMC_SRC=path/to/train_gpt2.c builds another source
#   make gate      the numerical drift gate against baselines/gate.json
#   make bench     speed and memory at GPT-2 124M scale, and a one-step check at GPT-2 medium's
#                  shape (d24: ~19 GiB, skipped when the memory is not available; ARGS=--no-d24)
#   make fuzz      the long hypothesis profile
#   make sanitize  ASan + UBSan build of the library, op and model tests against it
#   make variants  the non-slow suite against -O2, -O3, -O3 -march=native, -Ofast -march=native
#                  builds, each with 1, 2 and 4 OpenMP threads
#   make calibrate the worst observed tolerance constants over build variants, per op (seconds)
#                  and over ten training steps at GPT-2 124M's shape (about an hour on 2 cores;
#                  CALIBRATE_ARGS="--steps 3" or "--builds O3" for less)

PYTHON   ?= python3
VENV     ?= .venv
VPY      := $(VENV)/bin/python
LLMC_SRC ?= llmc/train_gpt2.c
LIB      ?= build/libtrain_gpt2.so
CFLAGS   ?= -O3
NO_OMP   ?=
PYTEST_ARGS ?=
# make test leaves out the tests marked slow (pyproject.toml's markers) unless SLOW=1
SLOW ?=
TEST_MARK := $(if $(SLOW),,-m 'not slow')
# pytest-xdist with one worker per core where there is more than one: on this project's
# 2-core machine make test (1,712 tests) took 2 min 47 s at a load of 2-3, make test-slow (39
# tests, two of them ten minutes each) 13 min 40 s at a load of 5-8
# (XDIST= runs them serially)
XDIST ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 1 ] && echo "-n $$n")

OMP_FLAG := $(if $(NO_OMP),--no-openmp,)

.PHONY: all lib venv test test-slow parity gate gate-update bench fuzz sanitize variants calibrate train_gpt2 clean

all: lib

# the virtual environment; reinstalled only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# the library is rebuilt only when the source, compiler or flags change (harness/clib/build.py)
lib:
	$(PYTHON) -m harness.clib.build --src '$(LLMC_SRC)' --out '$(LIB)' --cflags='$(CFLAGS)' $(OMP_FLAG)

# pytest's exit status 5 is "no tests collected": a run that checked nothing fails, saying so
NOTHING_RAN = { rc=$$?; [ $$rc -ne 5 ] || echo "make $@: pytest collected no tests (marker or -k selects nothing?)" >&2; exit $$rc; }

test: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VPY) -m pytest $(XDIST) $(TEST_MARK) $(PYTEST_ARGS) || $(NOTHING_RAN)

test-slow: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VPY) -m pytest $(XDIST) -m slow $(PYTEST_ARGS) || $(NOTHING_RAN)

parity: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VENV)/bin/llmc-parity run $(ARGS)

gate: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VENV)/bin/llmc-parity gate --baseline baselines/gate.json $(ARGS)

gate-update: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VENV)/bin/llmc-parity gate --baseline baselines/gate.json --update $(ARGS)

bench: venv lib
	LLMC_LIB='$(abspath $(LIB))' $(VPY) benchmarks/bench.py --json build/bench.json $(ARGS)
	LLMC_LIB='$(abspath $(LIB))' $(VPY) benchmarks/bench_model.py --json build/bench_model.json

fuzz: venv lib
	LLMC_LIB='$(abspath $(LIB))' HYPOTHESIS_PROFILE=long $(VPY) -m pytest tests/ops/test_fuzz.py $(PYTEST_ARGS)

# ASan's runtime must be loaded before the Python interpreter itself, from the compiler
# that built the library. Leak detection is on: it records only the allocating function
# (malloc_context_size=2) so that tests/lsan-python.supp can leave out what the
# interpreter, NumPy and torch keep at exit by design, never an allocation of the C.
SAN_CC ?= $(if $(filter cc,$(CC)),gcc,$(CC))
sanitize: venv
	CC=$(SAN_CC) $(PYTHON) -m harness.clib.build --src '$(LLMC_SRC)' --out build/libtrain_gpt2_san.so \
	    --cflags='-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined'
	LLMC_LIB='$(abspath build/libtrain_gpt2_san.so)' LD_PRELOAD="$$($(SAN_CC) -print-file-name=libasan.so)" \
	    ASAN_OPTIONS=detect_leaks=1:malloc_context_size=2:abort_on_error=1 \
	    LSAN_OPTIONS=suppressions=$(abspath tests/lsan-python.supp):print_suppressions=0 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(VPY) -m pytest -p no:cacheprovider -q tests/binding/test_binding.py tests/ops/test_ops.py \
	    tests/checks/test_model_parity.py tests/binding/test_hostile_*.py tests/binding/test_determinism.py $(PYTEST_ARGS)

# the non-slow suite against every legitimate build and several OpenMP thread counts: a
# test that assumes how the library was built fails here before it reaches a user
VARIANT_CFLAGS  ?= -O2|-O3|-O3 -march=native|-Ofast -march=native
VARIANT_THREADS ?= 1 2 4
variants: venv
	@set -e; flags='$(VARIANT_CFLAGS)'; IFS='|'; for f in $$flags; do \
	  tag=$$(echo "$$f" | tr -c 'A-Za-z0-9\n' _); \
	  $(PYTHON) -m harness.clib.build --src '$(LLMC_SRC)' --out "build/variants/lib_$$tag.so" --cflags="$$f"; \
	  for n in $(VARIANT_THREADS); do \
	    echo "=== CFLAGS='$$f' OMP_NUM_THREADS=$$n"; \
	    LLMC_LIB="$(abspath build/variants)/lib_$$tag.so" OMP_NUM_THREADS=$$n \
	      $(VPY) -m pytest -q -x -p no:cacheprovider -m 'not slow' $(PYTEST_ARGS); \
	  done; \
	done

CALIBRATE_ARGS ?=
calibrate: venv
	$(VPY) -m harness.calibrate
	$(VPY) -m harness.calibrate --scale --model tests/ports/model_ports.py:GPT $(CALIBRATE_ARGS)
	$(VPY) -m harness.calibrate --scale --builds O3 --refs '' --model tests/ports/model_ports.py:GPT --precision autocast=bf16 $(CALIBRATE_ARGS)
	$(VPY) -m harness.calibrate --scale --builds O3 --refs '' --model tests/ports/model_ports.py:GPT --precision params=bf16 $(CALIBRATE_ARGS)

# the standalone trainer (main() is compiled when TESTING is not defined)
train_gpt2: $(LLMC_SRC)
	$(CC) $(CFLAGS) -fopenmp -DOMP $(LLMC_SRC) -lm -o $@

clean:
	rm -rf build train_gpt2 .pytest_cache .hypothesis
