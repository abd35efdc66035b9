#!/usr/bin/env bash
# System packages the test suite uses for real (rsync is also the client of `gptrain data
# download --mirror rsync://...`). Installed with apt when missing (CI runs on a fresh machine
# as root); a no-op when everything is present.
set -euo pipefail
PACKAGES=(iproute2 util-linux slurm-wlm munge docker.io debootstrap chromium tini rsync)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${missing[*]}; install them with apt-get (needs root)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
