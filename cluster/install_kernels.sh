#!/usr/bin/env bash
# Build and install the CUDA kernels VMRNN can use (mamba_ssm's selective scan, optionally
# causal_conv1d) for THIS machine's GPU architecture(s) only, then check them against the PyTorch
# reference with `python -m vmrnn.ops.check_kernels`.
#
# Used by cluster/gpu.yaml on every GPU worker, and by hand on your own GPU machine:
#
#   bash cluster/install_kernels.sh                       # sources from PyPI (pip download)
#   bash cluster/install_kernels.sh --sdist-dir DIR       # offline: DIR holds mamba_ssm-*.tar.gz, ...
#   bash cluster/install_kernels.sh --with-causal-conv1d  # also causal_conv1d (VMRNN does not need it)
#
# Why a script: the packages' setup.py compile every architecture from sm_75 to sm_121 (long builds,
# and no environment variable narrows it), try to download a prebuilt wheel unless *_FORCE_BUILD
# is set (which crashes offline), and import torch, so pip's build isolation must be off.
# This script keeps only the local GPU's `-gencode` entries, forces the source build, reuses a wheel
# it built before (keyed by package version, torch, CUDA and architectures), and prints the time
# each package took.
#
# Needs: a CUDA build of torch already installed (the project pins it), nvcc whose CUDA major version
# matches torch's (CUDA_HOME, else nvcc on PATH, else /usr/local/cuda), a C++ compiler.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash cluster/install_kernels.sh [options]

  --sdist-dir DIR        build from the source archives in DIR (no network); default: download the
                         pinned sdists from PyPI with `pip download --no-binary`
  --with-causal-conv1d   also build causal_conv1d (VMRNN does not use it; its build is the longer one)
  --arch LIST            compute capabilities to build for, e.g. 89 or 8.0,9.0 (default: the visible GPUs)
  --wheel-dir DIR        where built wheels are kept and reused (default: ~/.cache/vmrnn-kernels)
  --jobs N               parallel compile jobs, MAX_JOBS (default: min(cores, GiB of RAM / 4))
  --python PY            the Python to build for (default: $PYTHON, else python3)
  --force                rebuild even if the kernels already pass the check or a cached wheel exists
  --no-check             do not run `python -m vmrnn.ops.check_kernels` at the end
  --dry-run              unpack and patch the sources and print the plan; build and install nothing
  -h, --help             this help

Versions (environment): MAMBA_VERSION (default 2.3.2.post1), CAUSAL_CONV1D_VERSION (default 1.7.0).
Exit status: 0 on success, non-zero with a message on stderr otherwise.
EOF
}

die() { echo "install_kernels.sh: error: $*" >&2; exit 1; }
note() { echo "install_kernels.sh: $*"; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SDIST_DIR=""
WITH_CONV=0
ARCH_ARG=""
WHEEL_DIR=${VMRNN_KERNEL_WHEEL_DIR:-$HOME/.cache/vmrnn-kernels}
JOBS=${MAX_JOBS:-}
FORCE=0
CHECK=1
DRY_RUN=0
MAMBA_VERSION=${MAMBA_VERSION:-2.3.2.post1}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-1.7.0}

while [ $# -gt 0 ]; do
  case "$1" in
    --sdist-dir) [ $# -ge 2 ] || die "--sdist-dir needs a directory"; SDIST_DIR=$2; shift 2 ;;
    --with-causal-conv1d) WITH_CONV=1; shift ;;
    --arch) [ $# -ge 2 ] || die "--arch needs a value, e.g. 89"; ARCH_ARG=$2; shift 2 ;;
    --wheel-dir) [ $# -ge 2 ] || die "--wheel-dir needs a directory"; WHEEL_DIR=$2; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --no-check) CHECK=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (set --python or \$PYTHON)"
# Absolute paths: the build runs in another directory. (No symlink resolution: a venv's python is one.)
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
case "$WHEEL_DIR" in /*) ;; *) WHEEL_DIR="$PWD/$WHEEL_DIR" ;; esac
if [ -n "$SDIST_DIR" ]; then
  [ -d "$SDIST_DIR" ] || die "--sdist-dir '$SDIST_DIR' is not a directory"
  SDIST_DIR=$(cd "$SDIST_DIR" && pwd)
fi
if [ -n "$JOBS" ]; then
  case "$JOBS" in ''|*[!0-9]*|0) die "--jobs must be a positive integer, got '$JOBS'" ;; esac
fi

pkgs=(mamba_ssm)
[ "$WITH_CONV" = 1 ] && pkgs+=(causal_conv1d)
check_args=()
[ "$WITH_CONV" = 1 ] && check_args+=(--causal-conv1d)

run_check() {  # the project's kernel check, with the repository importable
  PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m vmrnn.ops.check_kernels "${check_args[@]}"
}

first_file() {  # prints the first of its arguments that is a file
  local f
  for f in "$@"; do [ -f "$f" ] && { echo "$f"; return 0; }; done
  return 1
}

t_all=$(date +%s)

# --- what torch is this, and which architectures? ---------------------------------------------
torch_info=$("$PY" - <<'PY' 2>/dev/null || true
import torch
caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) \
    if torch.cuda.is_available() else []
print(torch.__version__.split("+")[0], torch.version.cuda or "none", ",".join(f"{a}{b}" for a, b in caps) or "none")
PY
)
if [ -z "$torch_info" ]; then
  [ "$DRY_RUN" = 1 ] || die "cannot import torch with $PY: install the project's pinned CUDA torch first"
  torch_info="unknown unknown none"
fi
read -r TORCH_VER TORCH_CUDA GPU_ARCHS <<<"$torch_info"
note "torch $TORCH_VER (CUDA $TORCH_CUDA), visible GPU architectures: $GPU_ARCHS"

if [ -n "$ARCH_ARG" ]; then
  ARCHS=$(echo "$ARCH_ARG" | tr -d '. ' | tr ',' '\n' | sort -un | paste -sd, -)
  case ",$ARCHS," in *,,*|*[!0-9,]*) die "--arch takes compute capabilities like 89 or 8.0,9.0; got '$ARCH_ARG'" ;; esac
elif [ "$GPU_ARCHS" != none ]; then
  ARCHS=$GPU_ARCHS
else
  die "no CUDA GPU is visible to torch, so the architecture is unknown; run this on the GPU machine or pass --arch (e.g. --arch 89)"
fi
note "building for sm_${ARCHS//,/, sm_}"

# --- fast path: already installed and correct ---------------------------------------------------
if [ "$DRY_RUN" = 0 ] && [ "$FORCE" = 0 ] && [ "$CHECK" = 1 ] && [ "$GPU_ARCHS" != none ]; then
  if out=$(run_check 2>&1); then
    echo "$out"
    note "the installed kernels already pass vmrnn.ops.check_kernels; nothing to do (--force rebuilds)"
    exit 0
  fi
fi

# --- toolchain checks -------------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
  [ "$TORCH_CUDA" != none ] || die "torch $TORCH_VER is a CPU-only build; install a CUDA build of torch first"
  nvcc=""
  for cand in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then nvcc=$cand; break; fi
  done
  [ -n "$nvcc" ] || die "nvcc not found (set CUDA_HOME, or use a CUDA *devel* image / toolkit matching torch's CUDA $TORCH_CUDA)"
  export CUDA_HOME=${CUDA_HOME:-$(cd "$(dirname "$nvcc")/.." && pwd)}
  export PATH="$CUDA_HOME/bin:$PATH"
  NVCC_VER=$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
  [ -n "$NVCC_VER" ] || die "could not read the CUDA version from '$nvcc --version'"
  note "nvcc $NVCC_VER at $nvcc"
  if [ "${NVCC_VER%%.*}" != "${TORCH_CUDA%%.*}" ]; then
    die "nvcc is CUDA $NVCC_VER but torch was built with CUDA $TORCH_CUDA: the major versions must match (torch's cpp_extension refuses otherwise). Use a CUDA ${TORCH_CUDA%%.*}.x toolkit (CUDA_HOME=...) or a torch build for CUDA ${NVCC_VER%%.*}.x"
  fi
  missing=$("$PY" - <<'PY'
import importlib.util, shutil
need = [m for m in ("setuptools", "wheel", "packaging") if importlib.util.find_spec(m) is None]
if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
    need.append("ninja")
print(" ".join(need))
PY
)
  if [ -n "$missing" ]; then
    note "installing build requirements: $missing"
    read -r -a missing_pkgs <<<"$missing"
    "$PY" -m pip install -q "${missing_pkgs[@]}" || die "could not install the build requirements ($missing); install them and re-run"
  fi
  if [ -z "$JOBS" ]; then
    cores=$(nproc 2>/dev/null || echo 4)
    mem_gib=$(awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 16)
    JOBS=$(( mem_gib / 4 )); [ "$JOBS" -ge 1 ] || JOBS=1; [ "$JOBS" -le "$cores" ] || JOBS=$cores
  fi
  note "compiling with MAX_JOBS=$JOBS"
fi

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/vmrnn-kernels.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT

# --- get the sources --------------------------------------------------------------------------
fetch_sdist() {  # fetch_sdist NAME VERSION -> prints the archive path
  local name=$1 version=$2 dist_name=${1//_/-} found=""
  if [ -n "$SDIST_DIR" ]; then
    for f in "$SDIST_DIR/$name-$version.tar.gz" "$SDIST_DIR/$dist_name-$version.tar.gz"; do
      [ -f "$f" ] && { found=$f; break; }
    done
    if [ -z "$found" ]; then
      local matches=("$SDIST_DIR/$name"-*.tar.gz "$SDIST_DIR/$dist_name"-*.tar.gz)
      local existing=()
      for f in "${matches[@]}"; do [ -f "$f" ] && existing+=("$f"); done
      [ "${#existing[@]}" -eq 1 ] || die "no single $name source archive in $SDIST_DIR (wanted $name-$version.tar.gz; found: ${existing[*]:-none})"
      found=${existing[0]}
      note "using $(basename "$found") from $SDIST_DIR (not the default $version)" >&2
    fi
  else
    mkdir -p "$BUILD/sdist"
    # Preparing the sdist's metadata runs its setup.py: skip its CUDA build and wheel download there.
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
      "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      -d "$BUILD/sdist" "$name==$version" >&2 \
      || die "pip download of $name==$version failed (offline? use --sdist-dir DIR with the .tar.gz archives)"
    found=$(first_file "$BUILD/sdist/$name"-*.tar.gz "$BUILD/sdist/$dist_name"-*.tar.gz) || die "pip download of $name==$version produced no .tar.gz"
  fi
  echo "$found"
}

# Keep only our architectures in setup.py's nvcc `-gencode` list: right before the flags are used
# (at the CXX11-ABI comment / `if FORCE_CXX11_ABI:` that both packages have), drop every gencode
# pair it collected and add ours.
patch_setup() {  # patch_setup SETUP_PY ARCHS
  "$PY" - "$1" "$2" <<'PY'
import re, sys
path, archs = sys.argv[1], sys.argv[2].split(",")
src = open(path).read()
anchor = re.search(r"^( +)# HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI", src, re.M) \
    or re.search(r"^( +)if FORCE_CXX11_ABI:", src, re.M)
if anchor is None or "cc_flag" not in src[: anchor.start()]:
    sys.exit(f"{path}: layout not recognised (no cc_flag list before the CXX11 ABI block); "
             "cannot restrict the CUDA architectures - update cluster/install_kernels.sh for this version")
ours = []
for a in archs:
    ours += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
line = (f"{anchor.group(1)}# vmrnn cluster/install_kernels.sh: build for this machine's GPU(s) only\n"
        f"{anchor.group(1)}cc_flag = [f for f in cc_flag if f != '-gencode' and not f.startswith('arch=')] + {ours!r}\n")
src = src[: anchor.start()] + line + src[anchor.start():]
compile(src, path, "exec")
open(path, "w").write(src)
print(" ".join(ours))
PY
}

# --- build, install ---------------------------------------------------------------------------
TAG="torch${TORCH_VER}-cu${TORCH_CUDA}-sm${ARCHS//,/_}"
for name in "${pkgs[@]}"; do
  t0=$(date +%s)
  if [ "$name" = mamba_ssm ]; then version=$MAMBA_VERSION; force_var=MAMBA_FORCE_BUILD
  else version=$CAUSAL_CONV1D_VERSION; force_var=CAUSAL_CONV1D_FORCE_BUILD; fi
  cache="$WHEEL_DIR/$name-$version/$TAG"
  wheel=$(first_file "$cache"/*.whl || true)
  if [ -n "$wheel" ] && [ "$FORCE" = 0 ] && [ "$DRY_RUN" = 0 ]; then
    note "$name $version: reusing $wheel"
  else
    archive=$(fetch_sdist "$name" "$version")
    top=$(tar tzf "$archive" | awk -F/ 'NR == 1 {print $1}')
    tar xzf "$archive" -C "$BUILD"
    [ -f "$BUILD/$top/setup.py" ] || die "$archive has no $top/setup.py"
    flags=$(patch_setup "$BUILD/$top/setup.py" "$ARCHS") || die "could not patch $top/setup.py"
    note "$name: $(basename "$archive") -> nvcc $flags"
    if [ "$DRY_RUN" = 1 ]; then
      note "$name: dry run, not building"
      continue
    fi
    arch_list=$(echo "$ARCHS" | tr ',' '\n' | sed 's/\(.*\)\(.\)$/\1.\2/' | paste -sd';' -)
    log="$BUILD/$name.log"
    note "$name $version: building (log: $log) ..."
    mkdir -p "$cache"
    if ! (cd "$BUILD/$top" && env "$force_var=TRUE" MAX_JOBS="$JOBS" TORCH_CUDA_ARCH_LIST="$arch_list" \
            "$PY" -m pip wheel -v --no-deps --no-build-isolation . -w "$cache" >"$log" 2>&1); then
      tail -40 "$log" >&2
      trap - EXIT
      die "building $name failed; the full log is $log"
    fi
    wheel=$(first_file "$cache"/*.whl) || die "pip wheel reported success but left no wheel in $cache"
    note "$name $version: built $(basename "$wheel") in $(( $(date +%s) - t0 )) s"
  fi
  # --no-deps: the kernels only need torch; mamba_ssm's other requirements (triton, transformers,
  # tilelang, ...) are for its model code, which vmrnn does not import.
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel" || die "pip install $wheel failed"
  note "$name $version: done in $(( $(date +%s) - t0 )) s (build or reuse + install)"
done

if [ "$DRY_RUN" = 1 ]; then
  note "dry run finished in $(( $(date +%s) - t_all )) s"
  exit 0
fi
note "kernels installed in $(( $(date +%s) - t_all )) s"
if [ "$CHECK" = 1 ] && [ "$GPU_ARCHS" = none ]; then
  note "no GPU is visible here, so vmrnn.ops.check_kernels was skipped: run it on the GPU machine"
elif [ "$CHECK" = 1 ]; then
  t0=$(date +%s)
  run_check || die "vmrnn.ops.check_kernels failed (see above)"
  note "check passed in $(( $(date +%s) - t0 )) s; total $(( $(date +%s) - t_all )) s"
fi
