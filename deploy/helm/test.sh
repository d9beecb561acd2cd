#!/usr/bin/env bash
# Tests the Helm chart deploy/helm/vigil: `helm lint`; `helm template` with the
# default values and every value set in deploy/helm/vigil/ci/, each manifest
# validated against the Kubernetes 1.30 schemas (kubernetes-validate --strict) and
# checked for what the schemas cannot see (security contexts, mounts behind every
# file variable, selectors, the generated keys matching each other); and value sets
# that must be refused. Run by `make test`; needs python3 (and the network once, to
# install kubernetes-validate into a cache).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
chart="$here/vigil"
kube_version=1.30.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vigil-tools"

say() { printf 'helm-test: %s\n' "$*"; }
die() { printf 'helm-test: FAIL: %s\n' "$*" >&2; exit 1; }

# --- helm: a real one when there is one, else the project's stand-in -----------
# (shared/ may be copied without its execute bits: a script there runs with bash).
helm=()
for candidate in "${VIGIL_HELM:-}" "$(command -v helm || true)" \
                 "$repo/../shared/tools/helm" /work/shared/tools/helm; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && [ -f "$candidate" ]; then helm=("$candidate"); break; fi
  if [ -n "$candidate" ] && [ -f "$candidate" ] && head -c 2 "$candidate" | grep -q '#!'; then helm=(bash "$candidate"); break; fi
done
[ ${#helm[@]} -gt 0 ] || die "no helm found: install helm (https://helm.sh), or set VIGIL_HELM to a helm binary or to the stand-in shared/tools/helm (looked in \$VIGIL_HELM, PATH, $repo/../shared/tools/helm, /work/shared/tools/helm)"
helm_version=$("${helm[@]}" version 2>&1) || die "${helm[*]} does not run: $helm_version"
say "helm: ${helm[*]} ($helm_version)"

# The stand-in renders through an install against a fake API server, which cannot
# run hooks (Helm validates hook objects against the server's OpenAPI document,
# which the fake does not serve). With it the migrations Job is rendered as an
# ordinary Job (migrations.helmHook=false) so it is still validated.
render_args=()
if [[ $helm_version == *helm-sdkpy* ]]; then
  render_args=(--set migrations.helmHook=false)
  say "the helm stand-in cannot run hooks: rendering with migrations.helmHook=false (the migrations Job as a plain Job)"
fi

# --- kubernetes-validate (and cryptography, to check generated keys) -----------
venv="$cache/kubernetes-validate"
if ! "$venv/bin/python" -c 'import kubernetes_validate, cryptography, yaml' 2>/dev/null; then
  say "installing kubernetes-validate into $venv"
  python3 -m venv --clear "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate>=1.30,<2' 'cryptography>=42' \
    || die "could not install kubernetes-validate from PyPI"
fi
kv="$venv/bin/kubernetes-validate"
py="$venv/bin/python"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Splits a rendered manifest into core objects (validated against Kubernetes'
# schemas) and custom resources (no schema offline: checked by checks.py instead),
# then checks what the schemas cannot.
cat >"$work/checks.py" <<'PY'
import base64, sys, urllib.parse
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

src, core_out, crd_out, hooks_expected = sys.argv[1:5]
external = set(sys.argv[5:])
docs = [d for d in yaml.safe_load_all(open(src)) if d]
crd_groups = ("monitoring.coreos.com/",)
core = [d for d in docs if not d["apiVersion"].startswith(crd_groups)]
crds = [d for d in docs if d["apiVersion"].startswith(crd_groups)]
with open(core_out, "w") as f:
    yaml.safe_dump_all(core, f)
with open(crd_out, "w") as f:
    yaml.safe_dump_all(crds, f)

errors = []
def check(ok, msg):
    if not ok:
        errors.append(msg)

by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
secrets = by_kind.get("Secret", {})
services = by_kind.get("Service", {})
for n in external & set(secrets):
    errors.append(f"Secret/{n} is rendered by the chart, yet it should be the existing one")
workloads = list(by_kind.get("Deployment", {}).values()) + list(by_kind.get("Job", {}).values())

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

# Pods: locked down, resources set, every file variable backed by a mount, every
# Secret either rendered here or one the value set names as existing.
file_vars = ("_FILE", "VIGIL_GRPC_TLS_CERT", "VIGIL_GRPC_TLS_KEY", "VIGIL_CONTROL_PLANE_CA",
             "VIGIL_PROXY_TLS_DIR", "VIGIL_SNAPSHOT_FILE")
for w in workloads:
    name = f'{w["kind"]}/{w["metadata"]["name"]}'
    pod = w["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, f"{name}: pod not runAsNonRoot/65532")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: pod seccomp not RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False, f"{name}: service account token mounted")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for v in volumes.values():
        refs = []
        if "secret" in v:
            refs.append(v["secret"]["secretName"])
        for s in v.get("projected", {}).get("sources", []):
            if "secret" in s:
                refs.append(s["secret"]["name"])
        for r in refs:
            check(r in secrets or r in external, f"{name}: volume {v['name']} uses Secret {r}, neither rendered nor expected to exist")
    for c in pod["containers"]:
        cname = f'{name}/{c["name"]}'
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: root filesystem writable")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: privilege escalation allowed")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cname}: capabilities not dropped")
        check(c.get("resources", {}).get("requests"), f"{cname}: no resource requests")
        check(c["image"].endswith(":0.1.0") or "@sha256:" in c["image"], f"{cname}: image {c['image']}")
        mounts = c.get("volumeMounts", [])
        for m in mounts:
            check(m["name"] in volumes, f"{cname}: mount {m['name']} has no volume")
        for e in c.get("env", []):
            if e["name"].endswith(file_vars) and "value" in e:
                path = e["value"]
                check(any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts),
                      f"{cname}: {e['name']}={path} is on no mounted volume")
        if w["kind"] == "Deployment":
            for p in ("livenessProbe", "readinessProbe"):
                check(p in c, f"{cname}: no {p}")
            paths = {c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe") if p in c}
            check(paths == {"/healthz", "/readyz"}, f"{cname}: probes on {paths}")
            ports = {p["name"] for p in c.get("ports", [])}
            for p in ("livenessProbe", "readinessProbe", "startupProbe"):
                if p in c:
                    check(c[p]["httpGet"]["port"] in ports, f"{cname}: {p} on unknown port")

# Services, PDBs and HPAs point at something.
deployments = by_kind.get("Deployment", {})
def pods_of(selector):
    return [d for d in deployments.values() if matches(selector, d["spec"]["template"]["metadata"]["labels"])]
for s in services.values():
    targets = pods_of(s["spec"]["selector"])
    check(len(targets) == 1, f"Service/{s['metadata']['name']}: selects {len(targets)} Deployments")
    for t in targets:
        ports = {p["name"] for c in t["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service/{s['metadata']['name']}: targetPort {p['targetPort']} not on the pods")
for p in by_kind.get("PodDisruptionBudget", {}).values():
    check(len(pods_of(p["spec"]["selector"]["matchLabels"])) == 1, f"PDB/{p['metadata']['name']}: selects no Deployment")
for h in by_kind.get("HorizontalPodAutoscaler", {}).values():
    target = h["spec"]["scaleTargetRef"]["name"]
    check(target in deployments, f"HPA/{h['metadata']['name']}: no Deployment {target}")
    check("replicas" not in deployments.get(target, {}).get("spec", {}), f"Deployment/{target}: replicas set beside an HPA")

# Custom resources: the ServiceMonitor must select the metrics Service and name its port.
for sm in by_kind.get("ServiceMonitor", {}).values():
    sel = sm["spec"]["selector"]["matchLabels"]
    hit = [s for s in services.values() if matches(sel, s["metadata"].get("labels", {}))]
    check(len(hit) == 1, f"ServiceMonitor/{sm['metadata']['name']}: selects {len(hit)} Services")
    for e in sm["spec"]["endpoints"]:
        check(any(e["port"] == p["name"] for s in hit for p in s["spec"]["ports"]), f"ServiceMonitor: port {e['port']} on no selected Service")
        check(e.get("path") == "/metrics", "ServiceMonitor: path is not /metrics")
for pr in by_kind.get("PrometheusRule", {}).values():
    for g in pr["spec"]["groups"]:
        for r in g["rules"]:
            check(r.get("alert") and r.get("expr") and "{{" not in r["expr"], f"PrometheusRule: bad rule {r.get('alert')}")

# Hooks: a real helm renders the migrations as a pre-install/pre-upgrade hook.
jobs = by_kind.get("Job", {})
if hooks_expected == "hooks":
    for j in jobs.values():
        check("pre-install" in j["metadata"].get("annotations", {}).get("helm.sh/hook", ""), f"Job/{j['metadata']['name']}: not a pre-install hook")

# The generated keys agree with each other and have the shapes the binary reads.
def data(secret, key):
    return base64.b64decode(secret["data"][key])
control = next((s for n, s in secrets.items() if n.endswith("-control-keys")), None)
proxy = next((s for n, s in secrets.items() if n.endswith("-proxy-keys")), None)
if control:
    check(len(data(control, "bootstrap-token")) >= 32, "bootstrap token shorter than 32")
    check(len(base64.b64decode(data(control, "secret-key"), validate=True)) == 32, "secret key is not base64 of 32 bytes")
    signing = serialization.load_pem_private_key(data(control, "signing-key"), None)
    check(isinstance(signing, ed25519.Ed25519PrivateKey), "signing key is not Ed25519")
    check(len(data(control, "fleet-join-token")) >= 32, "fleet join token shorter than 32")
if proxy:
    join = data(proxy, "join-token")
    check(len(join) >= 32, "join token shorter than 32")
    cert = x509.load_pem_x509_certificate(data(proxy, "snapshot-keys"))
    check(isinstance(cert.public_key(), ed25519.Ed25519PublicKey), "trusted snapshot key is not Ed25519")
    cookie = data(proxy, "cookie-keys").decode()
    for k in cookie.split(","):
        kid, _, key = k.partition(":")
        check(kid.isdigit() and 0 <= int(kid) <= 255 and len(base64.b64decode(key, validate=True)) == 32, f"cookie key {kid!r} malformed")
    check(not cookie.endswith("\n"), "cookie keys end with a newline")
    assertion = serialization.load_pem_private_key(data(proxy, "assertion-key"), None)
    check(isinstance(assertion, ec.EllipticCurvePrivateKey) and assertion.curve.name == "secp256r1", "assertion key is not P-256")
if control and proxy:
    check(join == data(control, "fleet-join-token"), "the proxies' join token is not the control plane's fleet join token")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    check(cert.public_key().public_bytes(*raw) == signing.public_key().public_bytes(*raw),
          "the proxies' trusted snapshot key is not the control plane's signing key")

# The generated gRPC certificate: signed by the CA the proxies trust, naming the host they dial.
tls = next((s for n, s in secrets.items() if n.endswith("-control-grpc-tls")), None)
proxy_dep = next((d for n, d in deployments.items() if n.endswith("-proxy")), None)
if tls:
    ca = x509.load_pem_x509_certificate(data(tls, "ca.crt"))
    leaf = x509.load_pem_x509_certificate(data(tls, "tls.crt"))
    ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm)
    key = serialization.load_pem_private_key(data(tls, "tls.key"), None)
    check(key.public_key().public_numbers() == leaf.public_key().public_numbers(), "gRPC key does not match its certificate")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    if proxy_dep:
        env = {e["name"]: e.get("value") for e in proxy_dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        url = urllib.parse.urlparse(env["VIGIL_CONTROL_PLANE"])
        check(url.scheme == "https", "proxies dial the generated-TLS control plane over http")
        check(url.hostname in names, f"the gRPC certificate does not name {url.hostname} (has {names})")
        check("VIGIL_CONTROL_PLANE_CA" in env, "proxies do not trust the generated CA")

for e in errors:
    print(f"  check failed: {e}", file=sys.stderr)
kinds = sorted({d["kind"] for d in docs})
print(f"{len(docs)} objects ({', '.join(kinds)})")
sys.exit(1 if errors else 0)
PY

failures=0 passes=0
fail() { printf 'helm-test: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
pass() { say "$*"; passes=$((passes + 1)); }

# --- lint --------------------------------------------------------------------
if ! "${helm[@]}" lint "$chart" "${render_args[@]}" >"$work/lint.log" 2>&1; then
  cat "$work/lint.log" >&2
  fail "helm lint"
else
  pass "helm lint: ok"
fi

# --- renders that must succeed and validate ------------------------------------
hooks=hooks
[ ${#render_args[@]} -eq 0 ] || hooks=no-hooks
render_and_validate() { # name, external secret names..., -- helm args...
  local name=$1; shift
  local external=()
  while [ "$1" != "--" ]; do external+=("$1"); shift; done
  shift
  local out="$work/$name.yaml"
  if ! "${helm[@]}" template vigil "$chart" -n vigil "${render_args[@]}" "$@" >"$out" 2>"$work/$name.err"; then
    cat "$work/$name.err" >&2
    fail "$name: helm template"
    return
  fi
  local summary
  if ! summary=$("$py" "$work/checks.py" "$out" "$work/$name.core.yaml" "$work/$name.crd.yaml" "$hooks" "${external[@]}"); then
    fail "$name: checks"
  fi
  if ! "$kv" --strict --quiet -k "$kube_version" "$work/$name.core.yaml" >"$work/$name.kv" 2>&1; then
    cat "$work/$name.kv" >&2
    fail "$name: kubernetes-validate --strict -k $kube_version"
    return
  fi
  # kubernetes-validate only warns about a kind it has no schema for: that would be
  # an object nobody validated.
  if grep -i "find schema" "$work/$name.kv" >&2; then
    fail "$name: objects without a schema (a custom resource? list its group in checks.py)"
    return
  fi
  pass "$name: ok: $summary"
  if grep -q '^kind:' "$work/$name.crd.yaml"; then
    say "$name: kubernetes-validate skipped these custom resources (no monitoring.coreos.com schema offline; checked above instead): $(grep '^kind:' "$work/$name.crd.yaml" | cut -d' ' -f2 | paste -sd' ' -)"
  fi
}

render_and_validate defaults --
for values in "$chart"/ci/*-values.yaml; do
  name=$(basename "$values" -values.yaml)
  case $name in
    existing-secrets) ext=(vigil-db vigil-control-keys-external vigil-proxy-keys-external vigil-grpc-cert vigil-grpc-ca vigil-proxy-certs) ;;
    loadbalancer-tls) ext=(auth-example-com-tls wildcard-apps-example-com-tls default-tls device-ca) ;;
    proxy-only) ext=(vigil-proxy-keys vigil-control-plane-ca) ;;
    *) ext=() ;;
  esac
  render_and_validate "$name" "${ext[@]}" -- -f "$values"
done

# The redirect sends browsers to the Service's port (443), while the proxy listens
# on unprivileged ports and needs no sysctl.
lb="$work/loadbalancer-tls.yaml"
if grep -A1 'name: VIGIL_PROXY_REDIRECT_HTTPS_PORT' "$lb" | grep -q 'value: "443"' &&
  grep -A1 'name: VIGIL_PROXY_LISTEN$' "$lb" | grep -q '0.0.0.0:8443' &&
  ! grep -q 'ip_unprivileged_port_start' "$lb"; then
  pass "redirect-to-service-port: ok (listens on 8443, redirects to 443, no sysctl)"
else
  grep -n -A1 'VIGIL_PROXY_REDIRECT\|VIGIL_PROXY_LISTEN\|sysctl' "$lb" >&2
  fail "redirect-to-service-port: the TLS proxy must redirect to the Service's port 443"
fi

# Client certificates: the bundle reaches the proxy as a file it names.
if grep -A1 'name: VIGIL_CLIENT_CA_FILE' "$lb" | grep -q 'value: /etc/vigil/client-ca/ca.crt' &&
  grep -B2 -A6 'name: client-ca$' "$lb" | grep -q 'secretName: device-ca' &&
  ! grep -q 'VIGIL_CLIENT_CA_FILE' "$work/defaults.yaml"; then
  pass "client-ca: ok (VIGIL_CLIENT_CA_FILE from the device-ca Secret; none by default)"
else
  grep -n -A1 'VIGIL_CLIENT_CA_FILE\|client-ca' "$lb" >&2
  fail "client-ca: proxy.clientCa must mount the Secret and set VIGIL_CLIENT_CA_FILE"
fi

# --- value sets that must be refused, each for its own reason ------------------
refuse() { # name, expected error (extended regexp), values (YAML)
  local name=$1 expected=$2
  printf '%s\n' "$3" >"$work/bad-$name.yaml"
  if "${helm[@]}" template vigil "$chart" -n vigil "${render_args[@]}" -f "$work/bad-$name.yaml" >"$work/bad-$name.out" 2>&1; then
    fail "refuse $name: the chart rendered values it must refuse"
  elif ! grep -Eqi -- "$expected" "$work/bad-$name.out"; then
    cat "$work/bad-$name.out" >&2
    fail "refuse $name: refused, but not with /$expected/"
  else
    pass "refuse $name: ok ($(grep -Eio -- "$expected" "$work/bad-$name.out" | head -1))"
  fi
}
refuse replicas-not-a-number 'replicas.*(integer|got string)|(integer|got string).*replicas' 'proxy: {replicas: "many"}'
refuse unknown-key 'replica[^s].*(additional|not allowed)|(additional|not allowed).*replica[^s]' 'proxy: {replica: 3}'
refuse bad-service-type 'type.*must be one of' 'proxy: {service: {type: Ingress}}'
refuse http-authenticate-url 'authenticateUrl.*not match pattern' 'proxy: {authenticateUrl: "http://auth.example.com"}'
refuse half-existing-secrets 'set both control.existingSecret and proxy.existingSecret' 'control: {existingSecret: mine}'
refuse grpc-secret-without-name 'control.grpcTls.secretName is required' 'control: {grpcTls: {mode: secret}}'
refuse client-ca-without-tls 'proxy.clientCa needs proxy.tls.secrets' 'proxy: {clientCa: {secretName: device-ca}}'
refuse proxy-only-without-keys 'proxy.existingSecret is required' 'control: {enabled: false}'

# --- docs/helm.md documents every value the schema knows -----------------------
if missing=$("$py" - "$chart/values.schema.json" "$repo/docs/helm.md" <<'PY'
import json, sys
schema, doc = json.load(open(sys.argv[1])), open(sys.argv[2]).read()
def leaves(node, path):
    strict = node.get("type") == "object" and node.get("additionalProperties") is False
    if strict and path[-1:] != ["resources"]:
        for key, sub in node["properties"].items():
            if key != "global":
                yield from leaves(sub, path + [key])
    else:
        yield ".".join(path)
missing = [p for p in leaves(schema, []) if f"`{p}`" not in doc]
print(" ".join(missing))
sys.exit(1 if missing else 0)
PY
); then
  pass "docs/helm.md documents every value"
else
  fail "docs/helm.md does not document: $missing"
fi

echo "helm-chart: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
