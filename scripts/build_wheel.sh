#!/usr/bin/env bash
# Builds dist/swift_qlora-<version>-py3-none-manylinux_2_<N>_x86_64.whl: a Python wheel that carries the static `qlora`
# binary as its command (as ruff and uv ship theirs), so `pip install` on a machine with Python and no Swift gives a
# working `qlora`. The binary links the Swift standard library statically and needs only glibc, libstdc++ and libgcc_s;
# N is the newest glibc symbol version it uses (objdump -T), so the tag says honestly which systems can run it.
#
# The wheel (PEP 427) is a zip of
#   swift_qlora-<v>.data/scripts/qlora      the stripped binary; pip installs it into the environment's bin/
#   swift_qlora-<v>.dist-info/METADATA      name, version, summary
#   swift_qlora-<v>.dist-info/WHEEL         Root-Is-Purelib: false and the tag
#   swift_qlora-<v>.dist-info/RECORD        each file's sha256 (urlsafe base64, no padding) and size
# written with Python's zipfile. The version is Sources/QLoRA/Support/Version.swift's; the git commit goes into the
# binary for `qlora --version` through Sources/qlora/BuildInfo.generated.swift, written here for the build and removed after.
#
# Usage: scripts/build_wheel.sh            (the build uses its own scratch folder, .build-static, not .build)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^ *public static let version = "\([^"]*\)"$/\1/p' Sources/QLoRA/Support/Version.swift)
if [ -z "$version" ]; then
    echo "build_wheel.sh: no 'public static let version = \"...\"' line in Sources/QLoRA/Support/Version.swift" >&2
    exit 1
fi
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- Sources Package.swift 2>/dev/null; then
    commit="$commit-dirty"  # built from sources that differ from the commit
fi

generated=Sources/qlora/BuildInfo.generated.swift
trap 'rm -f "$generated"' EXIT
cat > "$generated" <<EOF
// Written by scripts/build_wheel.sh for its build, then removed (git-ignored).
#if QLORA_BUILD_INFO
enum BuildInfo {
    static let commit = "$commit"
}
#endif
EOF

echo "build_wheel.sh: building qlora $version (commit $commit) with the static Swift standard library" >&2
flags=(-c release --static-swift-stdlib --product qlora --scratch-path .build-static -Xswiftc -DQLORA_BUILD_INFO)
swift build "${flags[@]}"
binary="$(swift build "${flags[@]}" --show-bin-path)/qlora"
rm -f "$generated"

stage=$(mktemp -d)
trap 'rm -f "$generated"; rm -rf "$stage"' EXIT
strip -o "$stage/qlora" "$binary"
chmod 755 "$stage/qlora"

# The newest glibc symbol version the binary asks for decides the manylinux tag (PEP 600: manylinux_<major>_<minor>).
glibc=$(objdump -T "$stage/qlora" | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2,2n -u | tail -1)
minor=${glibc#GLIBC_2.}
if [ -z "$minor" ]; then echo "build_wheel.sh: objdump -T found no GLIBC_2.x symbol versions in $binary" >&2; exit 1; fi
needed=$(objdump -p "$stage/qlora" | awk '/NEEDED/ {print $2}' | tr '\n' ' ')
for library in $needed; do
    case "$library" in
        libc.so.6|libm.so.6|libstdc++.so.6|libgcc_s.so.1|ld-linux-x86-64.so.2|libpthread.so.0|libdl.so.2|librt.so.1) ;;
        *) echo "build_wheel.sh: the binary needs $library, which manylinux systems need not have" >&2; exit 1 ;;
    esac
done
tag="py3-none-manylinux_2_${minor}_x86_64"
echo "build_wheel.sh: newest symbol versions: $glibc, $(objdump -T "$stage/qlora" | grep -o 'GLIBCXX_3\.4\.[0-9]*' | sort -t. -k3,3n -u | tail -1); libraries: $needed" >&2

"$stage/qlora" --version >&2
mkdir -p dist
python3 - "$stage/qlora" "$version" "$tag" "$commit" <<'PY'
import base64, hashlib, os, stat, sys, zipfile

binary, version, tag, commit = sys.argv[1:]
name = "swift_qlora"
data, info = f"{name}-{version}.data", f"{name}-{version}.dist-info"
metadata = f"""Metadata-Version: 2.1
Name: swift-qlora
Version: {version}
Summary: QLoRA fine-tuning of Llama-family models in Swift: the qlora command (CPU, and NVIDIA GPUs through the CUDA driver)
Requires-Python: >=3.8
License: see the project repository

The `qlora` command-line tool (git commit {commit}) as a static Linux x86_64 binary. After `pip install`, run
`qlora --help`. NVIDIA GPUs are used through the driver's libcuda.so.1, NVRTC and cuBLAS when present.
""".encode()
wheel = f"""Wheel-Version: 1.0
Generator: swift-qlora scripts/build_wheel.sh
Root-Is-Purelib: false
Tag: {tag}
""".encode()

def digest(content):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()

files = [(f"{data}/scripts/qlora", open(binary, "rb").read(), 0o755),
         (f"{info}/METADATA", metadata, 0o644),
         (f"{info}/WHEEL", wheel, 0o644)]
record = "".join(f"{path},{digest(content)},{len(content)}\n" for path, content, _ in files) + f"{info}/RECORD,,\n"
files.append((f"{info}/RECORD", record.encode(), 0o644))

out = os.path.join("dist", f"{name}-{version}-{tag}.whl")
partial = out + ".partial"
with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as z:
    for path, content, mode in files:
        entry = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
        entry.external_attr = (stat.S_IFREG | mode) << 16  # pip keeps the executable bit of scripts
        entry.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(entry, content)
os.replace(partial, out)
print(out)
PY
