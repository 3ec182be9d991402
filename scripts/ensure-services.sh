#!/usr/bin/env bash
# Make sure the services the integration tests use are available on this machine:
# * PostgreSQL on 127.0.0.1:5432 (trust auth). Installs it from Debian's packages when missing
#   (as root), starts the cluster when it is installed but stopped. With DATABASE_URL set, the
#   tests use that server instead and nothing is started here.
# * Orthanc (/usr/sbin/Orthanc) and DCMTK, installed from Debian's packages when missing. The
#   tests start their own throwaway Orthanc on free loopback ports; the Debian *service* (port
#   4242/8042, config /etc/orthanc) is stopped and its autostart disabled so it cannot interfere.
# * Orthanc's DICOMweb plugin (orthanc-dicomweb, /usr/share/orthanc/plugins/libOrthancDicomWeb.so):
#   the QIDO-RS/WADO-RS tests load it into their own Orthanc (dicom_assets_tests/orthanc.py).
# * GDCM's gdcmconv (libgdcm-tools): with DCMTK's codecs it writes the mixed-content test set
#   (dicom_assets/devpacs/mixed.py), JPEG 2000 included.
# * dicom3tools' dciodvfy (IOD checker): the de-identification tests compare its errors on an
#   original and on its de-identified copy (dicom_assets_tests/iod_check.py).
# * OpenSSH (sshd, ssh, ssh-keygen) and rsync for the publish-over-SSH tests, which start their
#   own sshd on a free loopback port. When this script installs openssh-server, the system ssh
#   service it brings (port 22 on every interface) is stopped and not started at boot.
# Debian packages are installed with --no-install-recommends: their Recommends (exim4, cron, polkitd,
# printer tools, avahi, upower, ghostscript, netpbm ...) are nothing the tests use (on a Debian 12
# minbase root: 212 packages instead of 372, see README). What the tests need comes as a dependency:
# a font for Chromium's screenshot (fonts-dejavu-core, through fontconfig-config), PostgreSQL's
# contrib modules (in postgresql-15), gdcmconv's JPEG 2000 (libopenjp2, not pvrg-jpeg).
# Without root (or sudo) nothing is installed; the script says what to run. Under CI=true a
# missing Orthanc (or DICOMweb plugin) is an error (the Orthanc tests would fail), elsewhere a
# warning (they skip).
set -euo pipefail

say() { echo "ensure-services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

pg_up() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }

if [ -n "${DATABASE_URL:-}" ]; then
  say "DATABASE_URL is set; using that PostgreSQL"
elif pg_up; then
  say "PostgreSQL is accepting connections on 127.0.0.1:5432"
else
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing PostgreSQL from Debian's packages"
    as_root apt-get update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql postgresql-client \
      || { say "cannot install PostgreSQL: run 'sudo apt-get install --no-install-recommends postgresql' or set DATABASE_URL"; exit 1; }
  fi
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -n "$version" ]; then
    conf=/etc/postgresql/$version/main
    # Tests connect over TCP as user postgres without a password (loopback only).
    if ! grep -q "dicom_assets" "$conf/pg_hba.conf" 2>/dev/null; then
      as_root sed -i '1i # dicom_assets tests: trust on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf" || true
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || as_root pg_ctlcluster "$version" main start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { say "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
  say "PostgreSQL started"
fi

# --- Orthanc, DCMTK, Chromium for the UI test, OpenSSH and rsync for publishing ---------------------
missing=()
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # QIDO-RS/WADO-RS tests
command -v storescu >/dev/null || missing+=(dcmtk)
command -v gdcmconv >/dev/null || missing+=(libgdcm-tools)  # JPEG 2000 for the mixed-content test set
command -v dciodvfy >/dev/null || missing+=(dicom3tools)  # IOD check of de-identified copies
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
installing_sshd=false
[ -x /usr/sbin/sshd ] || { missing+=(openssh-server); installing_sshd=true; }
{ command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; } || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
{ command -v zip >/dev/null && command -v unzip >/dev/null; } || missing+=(zip unzip)  # make bench: zip -r -6 vs ours
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} from Debian's packages"
  as_root apt-get update -qq || true
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    say "cannot install ${missing[*]}: run 'sudo apt-get install -y --no-install-recommends ${missing[*]}' (the tests that need them skip without them)"
    [ "${CI:-}" = "true" ] && exit 1
  fi
fi
if $installing_sshd && [ -x /usr/sbin/sshd ]; then
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now ssh >/dev/null 2>&1 || true
  else
    as_root service ssh stop >/dev/null 2>&1 || true
    as_root update-rc.d ssh disable >/dev/null 2>&1 || true
  fi
  say "installed openssh-server for the tests; its system service is stopped and disabled"
fi

# Orthanc processes running Debian's configuration (/etc/orthanc), i.e. the system service; the
# tests' own Orthancs run with a config file in a temp directory and are never touched.
system_orthanc_pids() {
  local pid
  for pid in $(pgrep -x Orthanc 2>/dev/null || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '/etc/orthanc'; then echo "$pid"; fi
  done
}

if [ -e /etc/init.d/orthanc ] || [ -e /lib/systemd/system/orthanc.service ]; then
  # No autostart at boot or after an upgrade.
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now orthanc >/dev/null 2>&1 || true
  else
    as_root update-rc.d orthanc disable >/dev/null 2>&1 || true
  fi
  pids=$(system_orthanc_pids)
  if [ -n "$pids" ]; then
    # Not 'service orthanc stop': Debian's init script also stops every process running
    # /usr/sbin/Orthanc (start-stop-daemon --exec), including other test runs' Orthancs.
    say "stopping the system Orthanc service (pid $(echo $pids)) so it cannot interfere with the tests"
    as_root kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do [ -z "$(system_orthanc_pids)" ] && break; sleep 0.5; done
    pids=$(system_orthanc_pids)
    [ -n "$pids" ] && { as_root kill -KILL $pids 2>/dev/null || true; }
    as_root rm -f /run/orthanc.pid || true
    [ -z "$(system_orthanc_pids)" ] || say "the system Orthanc is still running: stop it with 'sudo service orthanc stop'"
  fi
fi
if [ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null; then
  say "Orthanc $( (/usr/sbin/Orthanc --version 2>/dev/null || Orthanc --version) | head -n1 | awk '{print $2}') is installed; no system Orthanc service running"
fi
