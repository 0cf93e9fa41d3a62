#!/bin/sh
# Refresh the vendored onnxruntime-web files from the npm registry (README.md here says which and why):
#   sh ui/static/vendor/onnxruntime-web/refresh.sh [VERSION]
# npm pack checks the tarball against the registry's sha512 integrity; the script prints it for the README.
set -eu
version="${1:-$(cat "$(dirname "$0")/VERSION")}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --json "onnxruntime-web@$version" > pack.json && tar xzf "onnxruntime-web-$version.tgz")
for name in ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm; do
  cp "$work/package/dist/$name" "$here/$name"
done
echo "$version" > "$here/VERSION"
(cd "$here" && sha256sum ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm > SHA256SUMS)
grep -o '"integrity": *"[^"]*"' "$work/pack.json"
grep -o '"license": *"[^"]*"' "$work/package/package.json"
