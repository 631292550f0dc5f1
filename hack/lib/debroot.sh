# shellcheck shell=bash
# Assembles a root filesystem from Debian packages without running any of their scripts (the way
# distroless images are made): the packages and everything they depend on are downloaded once
# into $SVCPLANE_CACHE/debs (apt names each file by version, so the cache is keyed by version)
# and unpacked over a merged-/usr skeleton. Sourced by the image scripts.

DEBS_CACHE=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}/debs

# The packages PKG... pull in: themselves and their Depends/Pre-Depends, recursively, as the
# machine's apt sources resolve them (real packages only; virtual ones are provided by a real one
# that is also listed).
deb_closure() {
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$@" 2>/dev/null | grep -v '^[ <]' | sort -u
}

# Downloads the current candidate of each package into the cache (no-op when present) and prints
# the .deb paths.
deb_fetch() {
  mkdir -p "$DEBS_CACHE"
  local p v f
  for p in "$@"; do
    v=$(apt-cache policy "$p" | awk '/Candidate:/ {print $2; exit}')
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then echo "debroot: no candidate for $p (apt-get update?)" >&2; return 1; fi
    # apt writes an epoch's colon as %3a.
    f=$(printf '%s/%s_%s_' "$DEBS_CACHE" "$p" "${v//:/%3a}")
    if ! compgen -G "$f*.deb" >/dev/null; then
      (cd "$DEBS_CACHE" && apt-get download -q "$p=$v" >/dev/null 2>&1) \
        || { echo "debroot: cannot download $p=$v" >&2; return 1; }
    fi
    compgen -G "$f*.deb" | head -1
  done
}

# debroot_unpack ROOT PKG...: exactly these packages unpacked into ROOT (created); callers pass
# `deb_closure` output for a package and everything it needs, or a hand-picked list where a
# package's declared dependencies are only for its maintainer scripts. Documentation is trimmed
# to the copyright files.
debroot_unpack() {
  local root=$1; shift
  [ $# -gt 0 ] || { echo "debroot: no packages to unpack (apt-get update?)" >&2; return 1; }
  mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{etc,tmp,var,run}
  chmod 1777 "$root/tmp"
  # Debian 12 is merged-/usr; packages still ship /lib and /bin paths, so the top-level
  # directories are symlinks and tar must keep them (--keep-directory-symlink).
  local d
  for d in bin sbin lib lib64; do [ -e "$root/$d" ] || ln -s "usr/$d" "$root/$d"; done
  local debs deb
  mapfile -t debs < <(deb_fetch "$@")
  [ ${#debs[@]} -eq $# ] || return 1
  for deb in "${debs[@]}"; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root" \
      || { echo "debroot: cannot unpack $deb" >&2; return 1; }
  done
  find "$root/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
  find "$root/usr/share/doc" -type l -delete 2>/dev/null || true
  # glibc's iconv modules (8 MB) serve no program in these images.
  rm -rf "$root"/usr/share/{man,info,lintian,locale,bug,bash-completion} "$root"/usr/lib/x86_64-linux-gnu/gconv
}

# debroot_users ROOT: root and the conventional "nonroot" user 65532, for images that run as
# non-root.
debroot_users() {
  local root=$1
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
  printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
  mkdir -p "$root/root" "$root/home/nonroot"
}
