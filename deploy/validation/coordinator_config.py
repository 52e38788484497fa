"""Checks the example coordinator configurations in deploy/.

Parses each file as TOML and checks its [[workload_issuers]] entries against
the keys the coordinator documents: the known keys only; `issuer`,
`audience` and `trust_domain` present; a known `kind`; https issuers; at
most one of `jwks_file` and `jwks_url`; durations written as the
coordinator reads them; a `generic` issuer's `identity` template inside its
trust domain; no `tags` on a GitHub Actions issuer (every GitHub job could
carry them); never `allow_insecure_issuer`.

Usage: coordinator_config.py FILE.toml...   Exits 1 and names each problem.
"""

import re
import sys
import tomllib

TOP_LEVEL_KEYS = {
    "public_url",
    "listen",
    "http_listen",
    "metrics_listen",
    "policy",
    "oidc",
    "ephemeral_timeout",
    "workload_issuers",
    "store",
}
ISSUER_KEYS = {
    "issuer",
    "jwks_file",
    "jwks_url",
    "audience",
    "kind",
    "trust_domain",
    "max_token_age",
    "key_expiry",
    "tags",
    "ephemeral",
    "identity",
    "allow_insecure_issuer",
}
KINDS = {"kubernetes", "github-actions", "generic"}
DURATION = re.compile(r"^[0-9]+(s|m|h|d)$")


def main(paths):
    problems = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                config = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{path}: not valid TOML: {e}")
            continue
        problems += [f"{path}: {p}" for p in check_config(config)]
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


def check_config(config):
    problems = [
        f"unknown key {key!r}; the coordinator refuses it"
        for key in sorted(set(config) - TOP_LEVEL_KEYS)
    ]
    issuers = config.get("workload_issuers", [])
    if not isinstance(issuers, list):
        return problems + ["workload_issuers must be an array of tables: write [[workload_issuers]]"]
    for i, entry in enumerate(issuers):
        problems += [f"[[workload_issuers]] #{i + 1}: {p}" for p in check_issuer(entry)]
    return problems


def check_issuer(entry):
    problems = [
        f"unknown key {key!r}; the coordinator refuses it"
        for key in sorted(set(entry) - ISSUER_KEYS)
    ]
    issuer = entry.get("issuer")
    if not isinstance(issuer, str) or not issuer.startswith("https://"):
        problems.append(f"issuer {issuer!r} must be an https:// URL, the tokens' `iss`")
    if not isinstance(entry.get("audience"), str) or not entry.get("audience"):
        problems.append("audience is required: the tokens' `aud`, e.g. \"weft\"")
    kind = entry.get("kind")
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    if "jwks_file" in entry and "jwks_url" in entry:
        problems.append("give jwks_file or jwks_url, not both (neither: discovery)")
    for key in ("max_token_age", "key_expiry"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, str) and DURATION.match(value)):
            problems.append(f"{key} {value!r} is not a duration like \"10m\" or \"1h\"")
    if "ephemeral" in entry and not isinstance(entry["ephemeral"], bool):
        problems.append("ephemeral must be true or false")
    tags = entry.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.startswith("tag:") for t in tags):
        problems.append("tags must be a list of \"tag:NAME\"")
    if kind == "github-actions" and tags:
        problems.append("a github-actions issuer must not carry tags: every GitHub job could claim them")
    trust_domain = entry.get("trust_domain")
    if not isinstance(trust_domain, str) or not trust_domain:
        problems.append("trust_domain is required: the SPIFFE trust domain, e.g. \"cluster.local\"")
    if entry.get("allow_insecure_issuer", False) is not False:
        problems.append("allow_insecure_issuer is for local tests only; a deployment example never sets it")
    if kind == "generic":
        identity = entry.get("identity")
        prefix = f"spiffe://{trust_domain}/"
        if not isinstance(identity, str) or not (
            identity.startswith(prefix) or identity.startswith("spiffe://{trust_domain}/")
        ):
            problems.append(f"a generic issuer needs an identity template starting with {prefix}")
    elif "identity" in entry:
        problems.append(f"identity is for generic issuers; a {kind} issuer's identity is fixed")
    return problems


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
