# shellcheck shell=bash
# Builds programs from a Go module of the module proxy at a pinned version, in a throwaway module
# (a module's own go.mod may carry replace directives that `go install pkg@version` refuses), and
# publishes them atomically into a cache directory keyed by that version.

# go_build_module OUT MODULE VERSION TAGS LDFLAGS PKG...
#   OUT/<last element of PKG> for each PKG; TAGS is a -tags list (may be empty).
go_build_module() {
  local out=$1 module=$2 version=$3 tags=$4 ldflags=$5; shift 5
  command -v go >/dev/null || { echo "gobuild: go is not installed" >&2; return 1; }
  local work rc=0
  work=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-gobuild.XXXXXX")
  mkdir -p "$out"
  # A subshell whose every step is checked explicitly: `set -e` does not apply inside `||`.
  (
    cd "$work" || exit 1
    export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-local}
    go mod init svcplane.local/gobuild >/dev/null 2>&1 &&
      go mod edit -require="$module@$version" || exit 1
    modfile=$(go mod download -json "$module@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$modfile" ] || { echo "gobuild: cannot download $module@$version" >&2; exit 1; }
    # The module's own language version, so that the build behaves as upstream's does.
    go mod edit -go="$(awk '$1=="go"{print $2; exit}' "$modfile")" || exit 1
    { printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
      printf ')\n'; } > tools.go
    go mod tidy >&2 || exit 1
    for p in "$@"; do
      echo "gobuild: go build $p@$version" >&2
      CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "bin/${p##*/}" "$p" >&2 &&
        cp "bin/${p##*/}" "$out/.${p##*/}.partial" &&
        mv "$out/.${p##*/}.partial" "$out/${p##*/}" || exit 1
    done
  ) || rc=$?
  rm -rf "$work"
  return "$rc"
}
