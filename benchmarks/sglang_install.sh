#!/usr/bin/env bash
# A slim SGLang 0.5.11 (DFLASH) for a CUDA machine that already has Python 3.12, torch 2.11 (CUDA), transformers 5.x,
# triton, numpy and safetensors, such as this project's GPU machine (no network there): only what SGLang's server
# start-up imports travels, ~45 MiB instead of the ~810 MiB of sglang's full requirements.
#
#   bash benchmarks/sglang_install.sh wheels     # here, with PyPI and apt: $SGLANG_WHEELS/part-* (<= 50 MB each),
#                                                #   $SGLANG_WHEELS/SHA256SUMS (default .whl-sglang, git-ignored)
#   bash benchmarks/sglang_install.sh stash      # there: copy the carried parts to /tmp/sglang-wheels
#   bash benchmarks/sglang_install.sh install    # there: join the parts, check them, install into /tmp/sglang-site,
#                                                #   unpack libnuma, then check python, GPU, libnuma and sglang
#   eval "$(bash benchmarks/sglang_install.sh env)"   # there: the exports a server needs (PYTHONPATH, LD_LIBRARY_PATH,
#                                                #   SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1, SGLANG_ENABLE_JIT_DEEPGEMM=0)
#
# Every step can be run again (each starts from a clean folder); `install` stashes first, so `install` alone works.
# What is in the tar: sglang 0.5.11, sglang-kernel 0.4.2 pruned (no FA3 `flash_ops`, `flashmla_ops`, `sm100/`,
# `deep_gemm`, mscclpp: so serve with `--attention-backend triton`, Hopper/sm90 or older), flashinfer-python +
# apache-tvm-ffi, the small pure-Python/abi3 wheels of the server path (fastapi, pydantic, uvicorn, pyzmq, openai,
# jsonschema, ...), a stub `IPython` (sglang/utils.py imports only `IPython.display.HTML` / `display`), and the
# Debian `libnuma1` package (sgl_kernel needs libnuma.so.1; unpacked privately, not into /).
# Lazy or optional parts of sglang (xgrammar: launch with `--grammar-backend none`; flashinfer-cubin, FA3/FA4,
# cutlass-dsl, outlines, datasets, ...) are left out.
#
# On an ordinary CUDA machine with network access the same works in one go:
#   bash benchmarks/sglang_install.sh wheels install && eval "$(bash benchmarks/sglang_install.sh env)"
# (or simply `pip install "sglang==0.5.11"` into a fresh environment, which pulls torch 2.11 and the full ~810 MiB).
# Start servers through the project's launcher, which fixes two sglang 0.5.11 / transformers 5 mismatches:
#   python -m dflash.decoding.sglang_launch --model-path ... --speculative-algorithm DFLASH ...
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${SGLANG_WHEELS:-.whl-sglang}
STASH=${SGLANG_STASH:-/tmp/sglang-wheels}
SITE=${SGLANG_SITE:-/tmp/sglang-site}
PART_BYTES=50000000
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.11

wheels() {      # CPython 3.12, x86-64 Linux; minus what the GPU machine's image already has
  local build="$WHL/build" plat=()
  rm -rf "$WHL" && mkdir -p "$build/wheels" "$build/deb"
  for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
           manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
  done
  local dl=("$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}"
            -d "$build/wheels")
  # requirements that would drag torch/transformers in: without their dependencies
  "${dl[@]}" --no-deps "sglang==$SGLANG_VERSION" "sglang-kernel==0.4.2" "flashinfer-python==0.6.8.post1" \
    "compressed-tensors"
  "${dl[@]}" fastapi uvicorn python-multipart "pyzmq>=25.1.2" orjson pybase64 msgspec setproctitle \
    partial-json-parser "openai==2.6.1" jsonschema dill "soundfile==0.13.1" loguru gguf opentelemetry-api \
    "apache-tvm-ffi>=0.1.6,<0.2,!=0.1.8,!=0.1.8.post0"
  # in the image already (typing-extensions, anyio and annotated-doc travel: pydantic needs a recent one)
  (cd "$build/wheels" && rm -f numpy-* pyyaml-* PyYAML-* requests-* urllib3-* idna-* certifi-* charset_normalizer-* \
    tqdm-* click-* h11-* httpx-* httpcore-* attrs-* torch-* triton-* nvidia_* transformers-* safetensors-*)
  "$PY" - "$build/wheels" <<'EOF'
# sglang-kernel pruned (a new wheel with a correct RECORD), and a stub IPython wheel
import base64, hashlib, pathlib, sys, zipfile

out = pathlib.Path(sys.argv[1])
DROP = ("sgl_kernel/flash_ops", "sgl_kernel/flashmla_ops", "sgl_kernel/sm100/", "deep_gemm/", "_mscclpp",
        "lib/", "lib64/", "include/")

def digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

def write_wheel(path, files, record_name):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        rows = []
        for name, data in files:
            z.writestr(name, data)
            rows.append(f"{name},{digest(data)},{len(data)}")
        rows.append(f"{record_name},,")
        z.writestr(record_name, "\n".join(rows) + "\n")

src = next(out.glob("sglang_kernel-*.whl"))
with zipfile.ZipFile(src) as z:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    kept = [(n, z.read(n)) for n in z.namelist() if n != record and not n.startswith(DROP) and not n.endswith("/")]
src.unlink()
write_wheel(src, kept, record)                      # same file name: pip sees sglang-kernel 0.4.2
print(f"sglang-kernel pruned: {len(kept)} files, {src.stat().st_size / 2**20:.1f} MiB")

info = "ipython-0.0.0+dflash.stub.dist-info"
display = '''"""Stub of IPython.display for a server without IPython (sglang/utils.py imports HTML and display)."""


class HTML:
    def __init__(self, data=None, *args, **kwargs):
        self.data = data

    def _repr_html_(self):
        return self.data


def display(*objs, **kwargs):
    for obj in objs:
        print(obj)
'''
files = [("IPython/__init__.py", b'"""Stub IPython (dflash slim SGLang install): only IPython.display."""\n'),
         ("IPython/display.py", display.encode()),
         (f"{info}/METADATA", b"Metadata-Version: 2.1\nName: ipython\nVersion: 0.0.0+dflash.stub\n"),
         (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: dflash\nRoot-Is-Purelib: true\nTag: py3-none-any\n")]
write_wheel(out / "ipython-0.0.0+dflash.stub-py3-none-any.whl", files, f"{info}/RECORD")
EOF
  (cd "$build/deb" && apt-get download libnuma1 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  ls "$build"/deb/libnuma1_*_amd64.deb > /dev/null
  tar -C "$build" -cf "$WHL/sglang.tar" wheels deb && rm -rf "$build"
  (cd "$WHL" && sha256sum sglang.tar > SHA256SUMS && split -b "$PART_BYTES" -d sglang.tar part- && rm sglang.tar)
  ls -l "$WHL"
  du -sh "$WHL"
}

stash() {       # the carried parts to a place that outlives the working tree's next copy
  rm -rf "$STASH" && mkdir -p "$STASH"
  cp "$WHL"/SHA256SUMS "$STASH"/
  for f in "$WHL"/part-*; do cp "$f" "$STASH/"; echo "stashed $(basename "$f")"; done
}

check() {       # one line a check; the first that fails stops with a reason
  local name=$1; shift
  if out=$("$@" 2>&1); then echo "ok   $name: ${out##*$'\n'}"; else echo "FAIL $name: $out" >&2; exit 1; fi
}

install() {
  [ -f "$STASH/SHA256SUMS" ] || stash
  (cd "$STASH" && cat part-* > sglang.tar && sha256sum -c --quiet SHA256SUMS && echo "ok   sha256 of the joined parts")
  rm -rf "$STASH/wheels" "$STASH/deb" "$SITE"
  tar -C "$STASH" -xf "$STASH/sglang.tar"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$STASH"/wheels/*.whl
  mkdir -p "$SITE/.libnuma"
  local deb; deb=$(ls "$STASH"/deb/libnuma1_*_amd64.deb)
  if command -v dpkg > /dev/null; then dpkg -x "$deb" "$SITE/.libnuma"
  else (cd "$SITE/.libnuma" && ar x "$deb" data.tar.xz && tar -xJf data.tar.xz && rm data.tar.xz); fi
  eval "$(env_exports)"
  check "python 3.12" "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version; print(sys.version.split()[0])'
  check "nvidia-smi" sh -c 'nvidia-smi -L | head -1'
  check "torch.cuda" "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0))'
  check "libnuma.so.1" "$PY" -c 'import ctypes; ctypes.CDLL("libnuma.so.1"); print("loaded")'
  check "sglang >= $SGLANG_VERSION" "$PY" -c "import sglang
from packaging.version import Version
assert Version(sglang.__version__) >= Version('$SGLANG_VERSION'), sglang.__version__
print(sglang.__version__, sglang.__file__)"
  check "sgl_kernel" "$PY" -c 'import sgl_kernel; print(sgl_kernel.__file__)'
}

env_exports() { # the environment a server needs: eval "$(bash benchmarks/sglang_install.sh env)"
  local lib=$SITE/.libnuma/usr/lib/x86_64-linux-gnu f
  for f in "$SITE"/.libnuma/usr/lib/*/libnuma.so.1; do [ -e "$f" ] && lib=$(dirname "$f"); done
  echo "export PYTHONPATH=$SITE:$PWD/src\${PYTHONPATH:+:\$PYTHONPATH}"
  echo "export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  echo "export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 SGLANG_ENABLE_JIT_DEEPGEMM=0"
}

env() { env_exports; }

[ $# -gt 0 ] || { sed -n '2,26p' "$0"; exit 2; }
for step in "$@"; do "$step"; done
