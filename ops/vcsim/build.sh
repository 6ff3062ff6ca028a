#!/usr/bin/env bash
# Build the vCenter simulator (ops/vcsim/main.go) offline from Debian's govmomi sources.
#
#   ops/vcsim/build.sh [OUTPUT]      default: ${OMA_VCSIM_BIN:-$HOME/.cache/oma/vcsim}
#
# GOPATH mode, no network. The simulator package is copied into a temporary GOPATH
# and patched there (never in /usr/share/gocode, never committed): simulator 0.24.2
# panics in PropertyCollector.Fetch when a property is unset (obj.MissingSet[0] on an
# empty slice); the patch guards it as upstream later did and returns an empty value.
# Skips the build when OUTPUT is newer than main.go and this script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${OMA_VCSIM_BIN:-$HOME/.cache/oma/vcsim}}"
gocode=/usr/share/gocode
govmomi="$gocode/src/github.com/vmware/govmomi"

if [[ -x "$out" && "$out" -nt "$here/main.go" && "$out" -nt "$here/build.sh" ]]; then
    echo "vcsim is up to date: $out" >&2
    exit 0
fi

if ! command -v go >/dev/null 2>&1 || [[ ! -d "$govmomi/simulator" ]]; then
    echo "build.sh: needs the Go toolchain and govmomi's source (Debian 12 packages):" >&2
    echo "    apt-get install golang-go golang-github-vmware-govmomi-dev" >&2
    command -v go >/dev/null 2>&1 || echo "    missing: go" >&2
    [[ -d "$govmomi/simulator" ]] || echo "    missing: $govmomi/simulator" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/oma-vcsim-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The first GOPATH entry that has github.com/vmware/govmomi wins for every package under it,
# so mirror govmomi with symlinks and replace only simulator/ with a writable copy.
mirror="$work/src/github.com/vmware/govmomi"
mkdir -p "$work/src/omavcsim" "$mirror"
cp "$here/main.go" "$work/src/omavcsim/main.go"
for entry in "$govmomi"/*; do
    [[ "$(basename "$entry")" == simulator ]] || ln -s "$entry" "$mirror/"
done
cp -r "$govmomi/simulator" "$mirror/simulator"
chmod -R u+w "$mirror/simulator"

pc="$work/src/github.com/vmware/govmomi/simulator/property_collector.go"
if grep -q 'fault := obj.MissingSet\[0\].Fault' "$pc"; then
    # `if len(obj.PropSet) == 0 {` -> also require a MissingSet entry; otherwise fall through
    # and answer with an empty value (the property is simply unset).
    sed -i -e 's/^\(\s*\)if len(obj.PropSet) == 0 {$/\1if len(obj.PropSet) == 0 \&\& len(obj.MissingSet) > 0 {/' \
           -e 's/^\(\s*\)Returnval: obj.PropSet\[0\].Val,$/\1Returnval: fetchVal(obj.PropSet),/' "$pc"
    cat >> "$pc" <<'GO'

// fetchVal is added by OMA's ops/vcsim/build.sh: an unset property has no PropSet entry.
func fetchVal(set []types.DynamicProperty) types.AnyType {
	if len(set) == 0 {
		return nil
	}
	return set[0].Val
}
GO
    grep -q 'len(obj.MissingSet) > 0' "$pc" && grep -q 'fetchVal(obj.PropSet)' "$pc" \
        || { echo "build.sh: patching $pc failed" >&2; exit 3; }
fi

mkdir -p "$(dirname "$out")"
echo "building vcsim -> $out (GOPATH mode, offline; about a minute cold)" >&2
cd "$work/src/omavcsim"
GOPATH="$work:$gocode" GO111MODULE=off GOPROXY=off GOFLAGS= \
    go build -trimpath -ldflags '-s -w' -o "$out.tmp.$$" .
mv -f "$out.tmp.$$" "$out"
echo "built $out" >&2
