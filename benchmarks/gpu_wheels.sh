#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a lent GPU, downloaded here into .whl/ (ignored by git) for the
# device tool to carry. The GPU image has torch (CUDA 13.0), accelerate and tokenizers, but an older
# transformers and none of bitsandbytes, llguidance, rapidfuzz, anls-star or imagehash (docs/gpu-check.md).
#
#     bash benchmarks/gpu_wheels.sh              # ~30 MB in .whl/
#     bash benchmarks/gpu_wheels.sh --liger      # also liger-kernel, to try it (it did not work with transformers 5.24)
#
# bitsandbytes' wheel holds one library per CUDA and ROCm version (43 MB); only the image's CUDA 13.0 one and
# the CPU one are kept (4 MB), with the wheel's RECORD rewritten to match, so that the whole carry fits the
# device tool's 64 MiB with room to spare. CUDA_LIBRARY=cuda132 picks another.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
CUDA_LIBRARY=${CUDA_LIBRARY:-cuda130}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the GPU image's python3

# Pinned in requirements.txt; their own requirements that the image lacks at the versions installed here.
pinned=$(grep -E '^(transformers|peft|bitsandbytes|rapidfuzz|anls-star|jsonschema|llguidance|imagehash)==' \
  requirements.txt | sed 's/ .*//')
installed_version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
dependencies=""
for name in munkres jsonschema-specifications referencing rpds-py pywavelets; do
  dependencies="$dependencies $name==$(installed_version "$name")"
done
extra=""
if [[ "${1:-}" == "--liger" ]]; then extra="liger-kernel==0.8.5"; fi

mkdir -p "$WHEELS" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# pip matches a manylinux tag exactly: name the ones these packages are published under.
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_34_x86_64 -d "$WHEELS" $pinned $dependencies $extra

python3 - "$WHEELS" "$CUDA_LIBRARY" <<'EOF'
import glob, os, re, sys, zipfile

wheels, keep = sys.argv[1], sys.argv[2]
for path in glob.glob(os.path.join(wheels, "bitsandbytes-*.whl")):
    def dropped(name):  # every native library but the chosen CUDA one and the CPU one
        match = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", name)
        return bool(match) and match.group(1) not in (keep, "cpu")
    with zipfile.ZipFile(path) as source:
        names = source.namelist()
        if not any(dropped(name) for name in names):
            continue  # shrunk already
        if not any(name.endswith(f"libbitsandbytes_{keep}.so") for name in names):
            sys.exit(f"{path} has no libbitsandbytes_{keep}.so: set CUDA_LIBRARY to one it has")
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if dropped(info.filename):
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if not dropped(line.split(b",")[0].decode()))
                target.writestr(info, data)
    os.replace(path + ".tmp", path)
    print(f"{path}: kept libbitsandbytes_{keep}.so and the CPU library, {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
du -sh "$WHEELS"
ls "$WHEELS"
