//! What deploy/ ships for clusters, checked without running it:
//!
//! - the configuration templates of deploy/compose and deploy/kubernetes, rendered by the image's
//!   own entrypoint (deploy/docker/vigil-entrypoint) as a container would, load as valid node and
//!   coordinator files;
//! - deploy/kubernetes (kustomize) is accepted by the real API server of the dev cluster in
//!   `kubectl apply -k … --dry-run=server`: admission, defaulting and validation on the server,
//!   unknown fields refused by kubectl against the server's own schema. That server is
//!   Kubernetes 1.20, which has no policy/v1 PodDisruptionBudget (1.21) nor autoscaling/v2
//!   HorizontalPodAutoscaler (1.23): the manifests are applied with the component
//!   components/kube-1.20, which turns those two kinds into policy/v1beta1 and
//!   autoscaling/v2beta2, and the test proves that this is the only difference from what
//!   `kubectl apply -k deploy/kubernetes` sends to a newer cluster. So the v1 and v2 objects
//!   themselves are checked as their beta twins with the same fields; no newer API server
//!   accepts them here. Pods are not run: the dev cluster has no container runtime.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vigil_chaos::{env, output_text, random_suffix, repo_root};

/// A template rendered by vigil-entrypoint with these variables, into `dir/name`.
fn render(template: &Path, vars: &[(&str, &str)], dir: &Path, name: &str) -> PathBuf {
    let out_path = dir.join(name);
    let mut cmd = Command::new(repo_root().join("deploy/docker/vigil-entrypoint"));
    cmd.arg("true")
        .env("VIGIL_CONFIG_TEMPLATE", template)
        .env("VIGIL_CONFIG", &out_path);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vigil-entrypoint");
    assert!(
        out.status.success(),
        "rendering {} failed: {}",
        template.display(),
        output_text(&out)
    );
    out_path
}

#[test]
fn t10_config_templates_render_to_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root();
    for (template, vars) in [
        (
            "deploy/compose/vigil-node.toml",
            vec![
                ("VIGIL_NODE_ID", "gw-1"),
                ("VIGIL_DATA_DIR", "/var/lib/vigil"),
                ("VIGIL_ADMIN_LISTEN", "0.0.0.0:9187"),
                ("VIGIL_OIDC_ISSUER", "http://oidc:8080"),
                ("VIGIL_KAFKA_BROKERS", "kafka:9092"),
                ("VIGIL_KAFKA_TOPIC", "vigil-audit"),
                ("VIGIL_PG_LISTEN", "0.0.0.0:5432"),
                ("VIGIL_PG_HOST", "postgres"),
                ("VIGIL_PG_PORT", "5432"),
                ("VIGIL_PG_DATABASE", "app"),
                (
                    "VIGIL_COORDINATOR_ENDPOINTS",
                    r#""coordinator-1:7470", "coordinator-2:7470""#,
                ),
                ("VIGIL_PROXY_PROTOCOL_FROM", r#""172.30.57.10""#),
                ("VIGIL_DRAIN_TIMEOUT_SECS", "20"),
                ("VIGIL_SSH_LISTEN", "0.0.0.0:2222"),
                (
                    "VIGIL_SSH_HOST_KEY_FILE",
                    "/run/vigil-ssh/gateway_host_ed25519_key",
                ),
                ("VIGIL_SSHD_ADDR", "sshd:22"),
                (
                    "VIGIL_SSHD_HOST_KEY",
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP5OShICtsnEWFf7xpBegORkz7/x61Gd3RGK1hycbW6l",
                ),
                ("VIGIL_SSH_LOGIN", "vigil-ops"),
                ("VIGIL_SSH_GATEWAY_KEY_FILE", "/run/vigil-ssh/gateway_login_key"),
                (
                    "VIGIL_NODE_PEERS",
                    r#"{ id = "gw-1", url = "http://node-1:9187" }, { id = "gw-2", url = "http://node-2:9187" }"#,
                ),
            ],
        ),
        (
            "deploy/kubernetes/config/vigil-node.toml",
            vec![
                ("VIGIL_NODE_ID", "vigil-gateway-0"),
                ("VIGIL_NAMESPACE", "vigil"),
            ],
        ),
    ] {
        let path = render(&root.join(template), &vars, dir.path(), "node.toml");
        let config = vigil_node::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("{template} renders to an invalid node file: {e}"));
        assert_eq!(config.node.id, vars[0].1, "{template}");
        // Compose's HAProxy is the one balancer whose PROXY headers its nodes believe.
        let haproxy = "172.30.57.10".parse().unwrap();
        assert_eq!(
            config.node.proxy_protocol_from.contains(haproxy),
            template.starts_with("deploy/compose"),
            "{template}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("${"), "{template}: left unrendered:\n{text}");
    }
    for (template, host) in [
        ("deploy/compose/vigil-coordinator.toml", "coordinator-3"),
        (
            "deploy/kubernetes/config/vigil-coordinator.toml",
            "vigil-coordinator-2",
        ),
    ] {
        // The member id comes from the host name's ordinal on Kubernetes, from the
        // service's environment in Compose.
        let mut vars = vec![
            ("VIGIL_HOSTNAME", host),
            ("VIGIL_NAMESPACE", "vigil"),
            ("VIGIL_ADVERTISE", "coordinator-3:7470"),
        ];
        if template.starts_with("deploy/compose") {
            vars.extend([
                ("VIGIL_MEMBER_ID", "3"),
                ("VIGIL_MEMBER_LISTEN", "0.0.0.0:7470"),
                ("VIGIL_DATA_DIR", "/var/lib/vigil-coordinator"),
                ("VIGIL_OIDC_ISSUER", "http://oidc:8080"),
            ]);
        }
        let path = render(&root.join(template), &vars, dir.path(), "member.toml");
        let member = vigil_node::config::CoordinatorFile::load(&path)
            .unwrap_or_else(|e| panic!("{template} renders to an invalid member file: {e}"));
        // Every token a member accepts is an operator's: never the agents' audience.
        let audiences = member.identity.expect("operators' provider").audiences;
        assert!(
            !audiences.iter().any(|a| a == "urn:vigil:gateway"),
            "{template}: {audiences:?}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\nid = 3\n"), "{template}:\n{text}");
    }

    // A reference to an unset variable stops the container rather than leaving it empty.
    let out = Command::new(root.join("deploy/docker/vigil-entrypoint"))
        .arg("true")
        .env(
            "VIGIL_CONFIG_TEMPLATE",
            root.join("deploy/compose/vigil-node.toml"),
        )
        .env("VIGIL_CONFIG", dir.path().join("unset.toml"))
        .env_remove("VIGIL_NODE_ID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("VIGIL_NODE_ID"),
        "{}",
        output_text(&out)
    );
}

/// kubectl against the dev cluster as its admin.
fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", env().get("VIGIL_DEV_KUBE_ADMIN_KUBECONFIG"))
        .output()
        .expect("run kubectl (deploy/dev/setup.sh installs it)")
}

/// A namespace of the test's own on the dev cluster, deleted on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"]);
    }
}

/// An overlay in a temporary directory: deploy/kubernetes in `namespace`, optionally with
/// components/kube-1.20. kustomize takes only relative paths to other kustomizations.
fn overlay(dir: &Path, namespace: &str, old_cluster: bool) -> PathBuf {
    let up = "../".repeat(dir.components().count() - 1);
    let base = repo_root().join("deploy/kubernetes");
    let base = format!("{up}{}", base.strip_prefix("/").unwrap().display());
    let components = if old_cluster {
        format!("components:\n  - {base}/components/kube-1.20\n")
    } else {
        String::new()
    };
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             namespace: {namespace}\nresources:\n  - {base}\n{components}"
        ),
    )
    .unwrap();
    dir.to_path_buf()
}

fn kustomize(dir: &Path) -> String {
    let out = kubectl(&["kustomize", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        output_text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn objects<'a>(items: &'a [Value], kind: &str) -> Vec<&'a Value> {
    items.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(items: &'a [Value], kind: &str, name: &str) -> &'a Value {
    items
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn t20_kubernetes_manifests_accepted_by_the_api_server_in_dry_run() {
    let ns = Namespace(format!("vigil-test-{}", random_suffix()));
    let base_dir = tempfile::tempdir().unwrap();
    let old_dir = tempfile::tempdir().unwrap();

    eprintln!("phase: the 1.20 component changes nothing but two apiVersions");
    let base = kustomize(&overlay(base_dir.path(), &ns.0, false));
    let old = kustomize(&overlay(old_dir.path(), &ns.0, true));
    let (base_lines, old_lines): (Vec<&str>, Vec<&str>) =
        (base.lines().collect(), old.lines().collect());
    assert_eq!(base_lines.len(), old_lines.len());
    let mut changed: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (a, b) in base_lines.iter().zip(&old_lines) {
        if a != b {
            *changed.entry((a.to_string(), b.to_string())).or_default() += 1;
        }
    }
    let expected: BTreeMap<(String, String), usize> = [
        (("apiVersion: policy/v1", "apiVersion: policy/v1beta1"), 2),
        (
            (
                "apiVersion: autoscaling/v2",
                "apiVersion: autoscaling/v2beta2",
            ),
            1,
        ),
    ]
    .into_iter()
    .map(|((a, b), n)| ((a.to_string(), b.to_string()), n))
    .collect();
    assert_eq!(changed, expected);

    eprintln!(
        "phase: the base alone is refused by this 1.20 server (no policy/v1, autoscaling/v2)"
    );
    let out = kubectl(&["create", "namespace", &ns.0]);
    assert!(
        out.status.success(),
        "create namespace: {}",
        output_text(&out)
    );
    let out = kubectl(&[
        "apply",
        "-k",
        base_dir.path().to_str().unwrap(),
        "--dry-run=server",
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("PodDisruptionBudget")
            || output_text(&out).contains("HorizontalPodAutoscaler"),
        "{}",
        output_text(&out)
    );

    eprintln!("phase: kubectl apply -k --dry-run=server with components/kube-1.20");
    let out = kubectl(&[
        "apply",
        "-k",
        old_dir.path().to_str().unwrap(),
        "--dry-run=server",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "dry-run apply refused: {}",
        output_text(&out)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("a JSON List");
    let items = list["items"].as_array().expect("items").clone();

    let kinds: BTreeMap<String, usize> = items.iter().fold(BTreeMap::new(), |mut m, o| {
        *m.entry(o["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    let want: BTreeMap<String, usize> = [
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("ConfigMap", 2),
        ("Service", 3),
        ("StatefulSet", 2),
        ("PodDisruptionBudget", 2),
        ("HorizontalPodAutoscaler", 1),
        ("Job", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds, want, "what the server accepted");

    eprintln!("phase: what the server returned holds together");
    for o in &items {
        let kind = o["kind"].as_str().unwrap();
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
            assert_eq!(o["metadata"]["namespace"], ns.0.as_str(), "{kind}");
        }
    }
    // Secrets by reference: every secretKeyRef names the Secret "vigil", which the manifests
    // never contain; every configMap volume names a generated ConfigMap that is there.
    let config_maps: BTreeSet<&str> = objects(&items, "ConfigMap")
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let pod_specs: Vec<(&str, &Value)> = objects(&items, "StatefulSet")
        .into_iter()
        .chain(objects(&items, "Job"))
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap(),
                &o["spec"]["template"]["spec"],
            )
        })
        .collect();
    for (name, spec) in &pod_specs {
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        for c in spec["containers"].as_array().unwrap() {
            for e in c["env"].as_array().unwrap() {
                if let Some(r) = e["valueFrom"].get("secretKeyRef") {
                    assert_eq!(r["name"], "vigil", "{name}: {e}");
                }
            }
        }
        for v in spec["volumes"].as_array().unwrap() {
            if let Some(cm) = v.get("configMap") {
                assert!(
                    config_maps.contains(cm["name"].as_str().unwrap()),
                    "{name}: {v}"
                );
            }
        }
    }

    let coordinator = named(&items, "StatefulSet", "vigil-coordinator");
    assert_eq!(coordinator["spec"]["replicas"], 3);
    assert_eq!(
        coordinator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let headless = named(&items, "Service", "vigil-coordinator");
    assert_eq!(coordinator["spec"]["serviceName"], "vigil-coordinator");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);

    // The gateway: a volume per pod for the spool, readiness on /readyz, disposable behind its
    // Service, scaled by the HPA, one at a time by the budget.
    let gateway = named(&items, "StatefulSet", "vigil-gateway");
    let container = &gateway["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        gateway["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert!(container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "data" && m["mountPath"] == "/var/lib/vigil"));
    let labels = &gateway["spec"]["template"]["metadata"]["labels"];
    let service = named(&items, "Service", "vigil-gateway");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the gateway pods");
    }
    let hpa = named(&items, "HorizontalPodAutoscaler", "vigil-gateway");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "vigil-gateway");
    for pdb in objects(&items, "PodDisruptionBudget") {
        let name = pdb["metadata"]["name"].as_str().unwrap();
        let target = named(&items, "StatefulSet", name);
        let labels = &target["spec"]["template"]["metadata"]["labels"];
        for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "PodDisruptionBudget {name} selects its pods");
        }
    }
    let binding = named(&items, "ClusterRoleBinding", "vigil-gateway-impersonate");
    assert_eq!(binding["subjects"][0]["namespace"], ns.0.as_str());
    assert_eq!(
        gateway["spec"]["template"]["spec"]["serviceAccountName"],
        "vigil-gateway"
    );
}
