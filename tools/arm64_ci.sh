#!/usr/bin/env bash
# The aarch64 step of CI: edgephi's Arm kernels run on an emulated 64-bit Arm board.
#
# Builds once (cached in $EDGEPHI_ARM64_ROOT, default ~/.cache/edgephi-arm64/ci-root) a Debian arm64
# root with debootstrap, run through qemu-user-static and binfmt_misc, and a venv in it with the
# runtime's wheels from PyPI (nothing is compiled). Then, on a copy of this tree:
#   1. the kernel exactness tests for `neon` as a Cortex-A72 (Raspberry Pi 4) and for
#      `neon-dotprod` as a Cortex-A76 (Pi 5);
#   2. a greedy chat with the default model as a Cortex-A76, whose reply must equal this host's
#      (neon's kernels are the same code as in 1; one chat saves a five-minute compile).
# Cold: about 4 minutes for the root and a minute for the venv; then each step compiles its kernels
# under emulation, about 4 minutes apiece (the tests' parallel kernels are never cached, and a fresh
# clone's file times make numba recompile the chat's): about 12 minutes in all from a clean clone.
#
# It needs root (chroot, mounts, binfmt_misc). Without root, or where binfmt_misc cannot be
# mounted (an unprivileged container), it says so and exits 0: the step is skipped, not failed.
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$(pwd)
ROOT=${EDGEPHI_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/edgephi-arm64/ci-root}
SUITE=bookworm  # Python 3.11, as Raspberry Pi OS 12
WHEELS="numpy numba tiktoken safetensors click pytest gguf setuptools wheel"
PROMPT="Describe the water cycle in three sentences."
started=$(date +%s)
say() { echo "[arm64 $(( $(date +%s) - started ))s] $*"; }

skip() { say "skipped: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (chroot, mounts, binfmt_misc)"
[ "$(uname -m)" = x86_64 ] || skip "runs from an x86-64 host (on an Arm host, run the tests themselves)"
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
  || skip "binfmt_misc cannot be mounted here"

# --- host tools: qemu-user-static registers its binfmt handler with the F flag (works in a chroot)
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
  say "installing qemu-user-static, binfmt-support, debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    qemu-user-static binfmt-support debootstrap >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || skip "qemu-aarch64's binfmt handler lacks the F flag"

unmount() {
  for m in "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"; do
    if mountpoint -q "$m"; then umount -R "$m" 2>/dev/null || umount -R -l "$m"; fi
  done
}
trap unmount EXIT

# --- the arm64 root (debootstrap's second stage runs under qemu: the slow part of a cold run)
if [ ! -f "$ROOT/.edgephi-root-ok" ]; then
  unmount
  if [ -d "$ROOT" ]; then
    findmnt -R "$ROOT" -n >/dev/null 2>&1 && { echo "refusing to delete $ROOT: it still has mounts" >&2; exit 3; }
    rm -rf --one-file-system "$ROOT"
  fi
  mirror=$({ grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
             grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } | grep -v security | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  say "debootstrap arm64 $SUITE from $mirror"
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    "$SUITE" "$ROOT" "$mirror" > "$ROOT.debootstrap.log" 2>&1 || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb
  touch "$ROOT/.edgephi-root-ok"
fi
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount -t sysfs sys "$ROOT/sys"
if ! mountpoint -q "$ROOT/dev"; then mount --rbind /dev "$ROOT/dev"; mount --make-rslave "$ROOT/dev"; fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/certs/host-ca-bundle.crt"

inside() {  # inside CPU COMMAND...: run in the root as that CPU
  local cpu=$1; shift
  chroot "$ROOT" /usr/bin/env -i PATH=/opt/edgephi-venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/numba "$@"
}

if ! inside cortex-a72 /opt/edgephi-venv/bin/python -c "import numba, tiktoken, safetensors, click, pytest, gguf, wheel" 2>/dev/null; then
  say "venv with wheels: $WHEELS"
  rm -rf "$ROOT/opt/edgephi-venv"
  inside cortex-a72 /bin/sh -c "python3 -m venv /opt/edgephi-venv && /opt/edgephi-venv/bin/pip install -q \
    --only-binary=:all: $WHEELS"
fi

# --- this tree, copied (an editable install inside the root must not write into the checkout);
# tar keeps the files' times, so numba's cache in the root stays valid for unchanged sources
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
tar -C "$TREE" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' -cf - edgephi convert models tests setup.cfg \
  pyproject.toml README.md | tar -C "$ROOT/src" -xf -
# with its dependencies (wheels only): a dependency the venv lacks is installed, not missed
inside cortex-a72 /bin/sh -c "cd /src && pip install -q --only-binary=:all: --no-build-isolation -e . >/dev/null"

# --- 1. kernel exactness, the host ISA of each CPU (the twins are numpy: no torch needed)
KERNEL_TESTS="exact_on_int16 or gguf_formats_exact or activation or linear_matches or twin_is_ggufs or prompt_steps or prompt_attention or attention_masks or ordered_slots or int8_kv_blocks"
for pair in cortex-a72:neon cortex-a76:neon-dotprod; do
  cpu=${pair%%:*} isa=${pair#*:}
  say "kernel tests as $cpu ($isa)"
  inside "$cpu" /bin/sh -c "cd /src && EDGEPHI_ISA=$isa python -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py -k '($KERNEL_TESTS) and not every_isa'" | tail -3
done

# --- 2. greedy chat: the default model's reply as on this host
model=$(python -c "from edgephi.default_model import ensure_default_model; print(ensure_default_model(print))" | tail -1)
want=$(echo "$PROMPT" | edgephi chat -m "$model" --temperature 0 --max-tokens 60 2>/dev/null)
mkdir -p "$ROOT/opt/model" && cp -r "$model/." "$ROOT/opt/model/"
for pair in cortex-a76:neon-dotprod; do
  cpu=${pair%%:*} isa=${pair#*:}
  say "greedy chat as $cpu ($isa)"
  got=$(echo "$PROMPT" | inside "$cpu" /bin/sh -c "EDGEPHI_ISA=$isa edgephi chat -m /opt/model --temperature 0 \
    --max-tokens 60 2>/tmp/chat.err") || { tail -5 "$ROOT/tmp/chat.err" >&2; exit 1; }
  if [ "$got" != "$want" ]; then
    echo "arm64: $isa's greedy reply differs from this host's" >&2
    echo "  x86:   $want" >&2
    echo "  $isa: $got" >&2
    exit 1
  fi
done
say "passed: kernels exact on neon and neon-dotprod; the greedy reply equals this host's: $want"
