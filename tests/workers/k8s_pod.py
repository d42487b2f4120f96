"""Run one container's Python command as if inside its pod, for the manifest
execution tests.

On a cluster every pod has its own IP and the same port, and cluster DNS turns
names like ``distadam-digits-1.distadam-digits.default.svc`` into pod IPs.
Locally all "pods" share 127.0.0.1, so each gets its own port instead. This
wrapper is that pod network: it lets distadam resolve the cluster exactly as
it would in the pod (from JOB_COMPLETION_INDEX, TF_CONFIG, ...), then
translates each peer's DNS name to its local address through the table in
``K8S_POD_NETWORK`` (JSON ``{"name:port": "127.0.0.1:port"}``). A peer the
table does not know is an error, as an unresolvable name would be.

usage: k8s_pod.py SCRIPT [ARGS...]     (the container's ``python SCRIPT ARGS``)
"""

import dataclasses
import json
import os
import runpy
import sys

network = json.loads(os.environ.pop("K8S_POD_NETWORK"))

import distadam  # noqa: E402
from distadam import cluster  # noqa: E402

resolve_in_pod = cluster.resolve_cluster


def resolve_over_pod_network(environ=None):
    spec = resolve_in_pod(environ)
    unknown = [peer for peer in spec.peers if peer not in network]
    if unknown:
        raise SystemExit(f"k8s_pod: no pod answers at {unknown}; known names: {sorted(network)}")
    if spec.tf_config is None:
        return spec
    config = json.loads(json.dumps(spec.tf_config))
    for task_type, addresses in config["cluster"].items():
        config["cluster"][task_type] = [network.get(address, address) for address in addresses]
    return dataclasses.replace(spec, peers=tuple(network[p] for p in spec.peers), tf_config=config)


cluster.resolve_cluster = resolve_over_pod_network
distadam.resolve_cluster = resolve_over_pod_network

script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
