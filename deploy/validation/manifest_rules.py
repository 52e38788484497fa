"""weft's rules for its Kubernetes manifests, beyond what the schemas say.

The schemas accept a privileged container or a token for any audience; these
rules keep the manifests least-privileged and free of long-lived secrets:
every container drops all capabilities and adds at most NET_ADMIN, nothing is
privileged or escalates, root file systems are read-only, seccomp is
RuntimeDefault, resources are bounded, no Secret is read, the Kubernetes API
token is not mounted, and the only credential is a projected token for the
audience `weft` lasting at most an hour, mounted by weftd alone.

Usage: manifest_rules.py FILE.yaml...   Exits 1 and names each violation.
"""

import sys

import yaml

AUDIENCE = "weft"
MAX_TOKEN_SECONDS = 3600
ALLOWED_CAPABILITIES = {"NET_ADMIN"}
WORKLOAD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


def main(paths):
    problems = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                problems.append(f"{path}: not valid YAML: {e}")
                continue
        for doc in docs:
            problems += [f"{path}: {p}" for p in check_document(doc)]
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


def check_document(doc):
    if not isinstance(doc, dict):
        return [f"a document is a {type(doc).__name__}, not a Kubernetes object"]
    kind = doc.get("kind")
    name = f"{kind}/{doc.get('metadata', {}).get('name')}"
    if kind not in WORKLOAD_KINDS:
        return []
    spec = doc.get("spec", {})
    pod = spec if kind == "Pod" else spec.get("template", {}).get("spec", {})
    return [f"{name}: {p}" for p in check_pod(pod)]


def check_pod(pod):
    problems = []
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(
            "automountServiceAccountToken must be false: the pod needs the "
            "audience-bound weft token only, not a Kubernetes API token"
        )
    pod_seccomp = seccomp_type(pod.get("securityContext"))
    token_volumes = set()
    for volume in pod.get("volumes", []):
        problems += check_volume(volume, token_volumes)
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    for c in containers:
        problems += [
            f"container {c.get('name')}: {p}"
            for p in check_container(c, pod_seccomp, token_volumes)
        ]
    return problems


def check_volume(volume, token_volumes):
    name = volume.get("name")
    if "secret" in volume:
        return [f"volume {name} mounts a Secret; weft deployments carry no long-lived secret"]
    problems = []
    for source in volume.get("projected", {}).get("sources", []):
        if "secret" in source:
            problems.append(f"volume {name} projects a Secret; weft deployments carry no long-lived secret")
        token = source.get("serviceAccountToken")
        if token is None:
            continue
        token_volumes.add(name)
        if token.get("audience") != AUDIENCE:
            problems.append(
                f"volume {name}: serviceAccountToken audience is {token.get('audience')!r}; "
                f"set audience: {AUDIENCE} so the token is good for weft only"
            )
        seconds = token.get("expirationSeconds")
        if not isinstance(seconds, int) or seconds > MAX_TOKEN_SECONDS:
            problems.append(
                f"volume {name}: serviceAccountToken expirationSeconds is {seconds!r}; "
                f"set it to at most {MAX_TOKEN_SECONDS} so the token rotates hourly"
            )
    return problems


def check_container(c, pod_seccomp, token_volumes):
    problems = []
    sc = c.get("securityContext") or {}
    if sc.get("privileged") is not False:
        problems.append("securityContext.privileged must be false")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("securityContext.allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("securityContext.readOnlyRootFilesystem must be true")
    caps = sc.get("capabilities") or {}
    if caps.get("drop") != ["ALL"]:
        problems.append('securityContext.capabilities.drop must be ["ALL"]')
    extra = set(caps.get("add") or []) - ALLOWED_CAPABILITIES
    if extra:
        problems.append(
            f"securityContext.capabilities.add has {', '.join(sorted(extra))}; "
            f"weftd needs {', '.join(sorted(ALLOWED_CAPABILITIES))} only"
        )
    if (seccomp_type(sc) or pod_seccomp) != "RuntimeDefault":
        problems.append("seccompProfile must be RuntimeDefault (pod or container securityContext)")
    resources = c.get("resources") or {}
    for bound in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(bound) or {})
        if missing:
            problems.append(f"resources.{bound} lacks {', '.join(sorted(missing))}")
    for env in c.get("env", []):
        if "secretKeyRef" in (env.get("valueFrom") or {}):
            problems.append(f"env {env.get('name')} reads a Secret; weft deployments carry no long-lived secret")
    for source in c.get("envFrom", []):
        if "secretRef" in source:
            problems.append("envFrom reads a Secret; weft deployments carry no long-lived secret")
    runs_weftd = (c.get("command") or [""])[0].endswith("/weftd")
    for mount in c.get("volumeMounts", []):
        if mount.get("name") in token_volumes and not runs_weftd:
            problems.append(
                f"mounts the weft token volume {mount.get('name')}; only the weftd container may"
            )
    return problems


def seccomp_type(security_context):
    return ((security_context or {}).get("seccompProfile") or {}).get("type")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
