#!/usr/bin/env bash
# MPIJob worker: start sshd with a host key made for this pod, now.
#
# The key never leaves the pod and no two pods share one (the image carries
# none). Its certificate is signed with the job's own SSH key, which the
# mpi-operator generates per MPIJob and mounts at sshAuthMountPath; the
# launcher trusts exactly that key as a certificate authority
# (scripts/mpijob_launcher.sh), so a host key is verified within the job,
# and a pod of another job, or anything else answering on the name, is refused.
#
# Environment (set in k8s/mpijob/mpijob.yaml):
#   DISTADAM_SSH_AUTH_DIR   where the job's key is mounted (= sshAuthMountPath)
#   DISTADAM_NAMESPACE      the pod's namespace (downward API)
#   HOSTNAME                <job>-worker-<i>, the pod's name
#   DISTADAM_SSHD           the sshd to run (default /usr/sbin/sshd)
set -euo pipefail
auth=${DISTADAM_SSH_AUTH_DIR:?set DISTADAM_SSH_AUTH_DIR to the MPIJob sshAuthMountPath}
namespace=${DISTADAM_NAMESPACE:?set DISTADAM_NAMESPACE from metadata.namespace}
case "$HOSTNAME" in
  *-worker-[0-9]*) job=${HOSTNAME%-worker-*} ;;
  *) echo "mpijob_worker_sshd: HOSTNAME=$HOSTNAME is not <job>-worker-<index>" >&2; exit 2 ;;
esac
[ -r "$auth/id_rsa" ] || { echo "mpijob_worker_sshd: no job key at $auth/id_rsa" >&2; exit 2; }

dir=${TMPDIR:-/tmp}/sshd
rm -rf "$dir"
mkdir -m 700 -p "$dir"
ssh-keygen -q -t ed25519 -N "" -C "$HOSTNAME" -f "$dir/host_ed25519_key"
# The names the launcher may use for this pod: the hostfile's
# <pod>.<job>.<namespace>.svc, and its short and cluster.local forms.
principals="$HOSTNAME,$HOSTNAME.$job,$HOSTNAME.$job.$namespace.svc,$HOSTNAME.$job.$namespace.svc.cluster.local"
ssh-keygen -q -h -s "$auth/id_rsa" -I "$HOSTNAME" -n "$principals" -V -5m:+30d "$dir/host_ed25519_key.pub"
cat > "$dir/sshd_config" <<CONFIG
Port 2222
HostKey $dir/host_ed25519_key
HostCertificate $dir/host_ed25519_key-cert.pub
PidFile none
# The job key is mounted read-only by the operator with modes sshd's
# StrictModes would reject for a non-root sshd.
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AuthorizedKeysFile $auth/authorized_keys
CONFIG
exec "${DISTADAM_SSHD:-/usr/sbin/sshd}" -De -f "$dir/sshd_config"
