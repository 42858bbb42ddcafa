#!/usr/bin/env bash
# Builds the Go example offline, against Debian's packaged Go and golang-jwt
# (apt install golang-go golang-github-golang-jwt-jwt-dev): the module's dependency is
# assembled into a vendor directory from /usr/share/gocode, in a temporary copy of this
# directory, and built with the module proxy off.
#
# Usage: examples/integrate/go/build.sh OUTPUT
#
# With network access to the Go module proxy, a plain `go mod tidy && go build` works too
# (it fetches the same version, v4.4.3, from the proxy instead).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTPUT}
gocode=${GOCODE:-/usr/share/gocode/src}
jwt_src=$gocode/github.com/golang-jwt/jwt

command -v go >/dev/null || { echo "go is missing: install the Debian package golang-go" >&2; exit 1; }
if [ ! -f "$jwt_src/go.mod" ] || ! grep -qx 'module github.com/golang-jwt/jwt/v4' "$jwt_src/go.mod"; then
  echo "golang-jwt v4 is missing from $gocode: install the Debian package golang-github-golang-jwt-jwt-dev" >&2
  exit 1
fi
version=$(sed -n 's/^require github.com\/golang-jwt\/jwt\/v4 \(v[0-9.]*\)$/\1/p' "$here/go.mod")
# The packaged version must be the one go.mod names (Debian's 4.4.3-1 is upstream v4.4.3).
if packaged=$(dpkg-query -W -f='${Version}' golang-github-golang-jwt-jwt-dev 2>/dev/null); then
  if [ "v${packaged%-*}" != "$version" ]; then
    echo "golang-github-golang-jwt-jwt-dev is $packaged; go.mod names $version" >&2
    exit 1
  fi
fi

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp "$here"/go.mod "$here"/*.go "$build/"
vendored=$build/vendor/github.com/golang-jwt/jwt/v4
mkdir -p "$vendored"
for file in "$jwt_src"/*.go; do
  case "$file" in *_test.go) ;; *) cp "$file" "$vendored/" ;; esac
done
cp "$jwt_src/go.mod" "$vendored/"
cat >"$build/vendor/modules.txt" <<MODULES
# github.com/golang-jwt/jwt/v4 $version
## explicit; go 1.16
github.com/golang-jwt/jwt/v4
MODULES

case "$out" in /*) ;; *) out=$PWD/$out ;; esac
cd "$build"
export GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local
go vet .
go build -trimpath -o "$out" .
