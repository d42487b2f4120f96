#!/usr/bin/env bash
# MPIJob launcher: trust the job's workers, then run the command (horovodrun ...).
#
# Each worker presents a host certificate signed with the job's SSH key
# (scripts/mpijob_worker_sshd.sh). The known_hosts written here trusts that
# key, and only it, as the certificate authority for every host; the image's
# ssh_config checks host keys strictly against this file. No key is ever
# accepted on first use.
#
# Environment (set in k8s/mpijob/mpijob.yaml):
#   DISTADAM_SSH_AUTH_DIR     where the job's key is mounted (= sshAuthMountPath)
#   DISTADAM_SSH_KNOWN_HOSTS  the file the image's ssh_config reads (/tmp/ssh/known_hosts)
set -euo pipefail
auth=${DISTADAM_SSH_AUTH_DIR:?set DISTADAM_SSH_AUTH_DIR to the MPIJob sshAuthMountPath}
known_hosts=${DISTADAM_SSH_KNOWN_HOSTS:?set DISTADAM_SSH_KNOWN_HOSTS}
[ -r "$auth/id_rsa.pub" ] || { echo "mpijob_launcher: no job key at $auth/id_rsa.pub" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: mpijob_launcher.sh COMMAND [ARGS...]" >&2; exit 2; }
mkdir -m 700 -p "$(dirname "$known_hosts")"
printf '@cert-authority * %s\n' "$(cat "$auth/id_rsa.pub")" > "$known_hosts"
exec "$@"
