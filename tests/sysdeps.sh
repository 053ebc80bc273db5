#!/usr/bin/env bash
# System packages that the suite uses beyond the virtualenv, installed by `make test` (through `make sysdeps`)
# where the machine lets us, and otherwise reported with what to run. Never fatal: a group that cannot be had
# makes its tests skip with the reason (for the Rust SDK: tests/rust_toolchain.py), never a red suite.
#
#   bash tests/sysdeps.sh [GROUP...]      groups: rust systemd browser prometheus mpi (default: all)
#
# Debian or Ubuntu as root: apt-get (one `apt-get update`, only when something is missing).
# macOS with Homebrew: brew (rust, zeromq, pkg-config); crates then come from crates.io.
# Anything else: one line per missing group, saying how to get it.
# Every command comes from PATH (tests/test_sysdeps.py runs this script against fake apt-get, dpkg-query and brew).
set -u

RUST_DEBS="cargo rustc pkg-config libzmq3-dev librust-zmq-dev librust-rmp-serde-dev librust-serde-dev
  librust-serde-json-dev librust-sha2-dev librust-libc-dev"
RUST_BREWS="rust zeromq pkg-config"
SYSTEMD_DEBS="systemd"
BROWSER_DEBS="chromium chromium-driver"  # the dashboard's page, loaded headless
PROMETHEUS_DEBS="prometheus"  # promtool and a real server scraping /metrics
MPI_DEBS="openmpi-bin libopenmpi-dev"  # mpirun, and the libmpi.so that MLX dlopens (the -dev package's symlink)

log() { echo "sysdeps: $*"; }

debs_of() {
  case "$1" in
    rust) echo "$RUST_DEBS" ;;
    systemd) echo "$SYSTEMD_DEBS" ;;
    browser) echo "$BROWSER_DEBS" ;;
    prometheus) echo "$PROMETHEUS_DEBS" ;;
    mpi) echo "$MPI_DEBS" ;;
  esac
}

# Installed means dpkg's "ii": `dpkg -s` also succeeds for a removed package whose config files remain ("rc").
debs_missing() {
  local deb
  for deb in $1; do
    case "$(dpkg-query -W -f='${db:Status-Abbrev}' "$deb" 2>/dev/null)" in
      ii*) ;;
      *) return 0 ;;
    esac
  done
  return 1
}

APT_UPDATED=0
apt_install() {  # GROUP PACKAGES...
  local group=$1; shift
  if [ "$APT_UPDATED" = 0 ]; then
    timeout 300 apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (trying the install anyway)"
    APT_UPDATED=1
  fi
  log "installing $group: apt-get install $*"
  if DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "$@" >/dev/null 2>&1; then
    log "$group: installed"
  else
    log "$group: NOT installed (apt-get install $* failed); its tests will skip and say why"
  fi
}

on_debian() {
  local group debs
  for group in "$@"; do
    debs=$(debs_of "$group")
    # shellcheck disable=SC2086
    if ! debs_missing "$debs"; then
      log "$group: present"
    elif [ "$(id -u)" != 0 ]; then
      log "$group: missing; as root: apt-get install $(echo $debs)"
    else
      # shellcheck disable=SC2086
      apt_install "$group" $debs
    fi
  done
}

on_mac() {
  local group
  for group in "$@"; do
    case "$group" in
      rust)
        # shellcheck disable=SC2086
        if brew list $RUST_BREWS >/dev/null 2>&1; then
          log "rust: present (Homebrew)"
        else
          log "installing rust: brew install $RUST_BREWS"
          # shellcheck disable=SC2086
          brew install $RUST_BREWS >/dev/null 2>&1 && log "rust: installed" \
            || log "rust: NOT installed (brew install $RUST_BREWS failed); the Rust SDK tests will skip"
        fi ;;
      systemd) log "systemd: not on macOS (launchd is tested instead)" ;;
      *) log "$group: not installed on macOS by make test; its tests skip and say why" ;;
    esac
  done
}

main() {
  local groups=("$@")
  [ ${#groups[@]} -gt 0 ] || groups=(rust systemd browser prometheus mpi)
  case "$(uname -s)" in
    Darwin)
      if command -v brew >/dev/null 2>&1; then
        on_mac "${groups[@]}"
      else
        log "no Homebrew: for the Rust SDK tests, install rust and zeromq (https://brew.sh: brew install $RUST_BREWS)"
      fi ;;
    Linux)
      if command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
        on_debian "${groups[@]}"
      else
        log "no apt-get here: install cargo and libzmq with your package manager, and set MLXSUP_RUST_CRATES_IO=1" \
          "to build the Rust SDK from crates.io"
      fi ;;
    *) log "unknown system $(uname -s): nothing installed" ;;
  esac
  return 0
}

main "$@"
