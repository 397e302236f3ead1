//! `vigil kubeconfig` and `vigil kube-credential`: kubectl (and any client-go or kube-rs
//! client) through the gateway's Kubernetes listener.
//!
//! The gateway names a cluster by a path prefix: a kubeconfig's `server` is
//! `https://GATEWAY:PORT/clusters/NAME`, and the client appends `/api/...` to it. The caller's
//! bearer token is a Vigil token. A person's kubeconfig runs `vigil kube-credential` as a
//! client-go exec credential plugin, which hands out the token `vigil login` kept, with its
//! expiry, so client-go asks again when it runs out; an agent's kubeconfig carries its token
//! itself (`--static-token`).
//!
//! Kubeconfigs are written as JSON (a kubeconfig may be JSON: kubectl reads either), which keeps
//! a YAML library out of the CLI. The price: `--output` merges only into a JSON kubeconfig; a
//! YAML file (`~/.kube/config` as kubectl writes it) is refused, never rewritten, and the
//! message says how to list both files in `KUBECONFIG` instead.
//!
//! There is no refresh token: when the kept token has expired, the plugin fails with "run vigil
//! login" rather than hand out a token the gateway would refuse.

use crate::ssh::{vigil_home, TokenArgs};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The exec credential API both the kubeconfig entry and the plugin's answer name (client-go
/// refuses an answer whose version differs from the one it asked for). kubectl 1.22 and later.
pub const EXEC_API_VERSION: &str = "client.authentication.k8s.io/v1";

/// The path prefix of a cluster on the gateway's listener (`/clusters/NAME`).
pub use vigil_node::kube::config::CLUSTER_PREFIX;

#[derive(clap::Args)]
pub struct KubeconfigArgs {
    /// The cluster's name on the gateway (its `[[kubernetes.clusters]] name`).
    pub cluster: String,
    /// The gateway's Kubernetes listener, `https://HOST:PORT` (its `[kubernetes] listen`);
    /// the kubeconfig's server is this URL with `/clusters/CLUSTER` appended.
    #[arg(long, env = "VIGIL_KUBE_SERVER")]
    pub server: String,
    /// A PEM file of the CA (or the self-signed certificate, `<data_dir>/tls-kubernetes/cert.pem`
    /// of a gateway that generated its own) the listener presents; written into the kubeconfig.
    /// Default: the system's roots.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Put the token itself into the kubeconfig (`token:`; for agents), instead of running
    /// `vigil kube-credential` for it. The kubeconfig stops working when that token expires.
    #[arg(long)]
    pub static_token: bool,
    // With --static-token: the token to write (default: the one the last `vigil login` kept).
    #[command(flatten)]
    pub token: TokenArgs,
    /// Merge the cluster, user and context into this JSON kubeconfig (created if missing,
    /// mode 0600) instead of printing a kubeconfig. A YAML file is refused, not rewritten.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The Vigil home the plugin reads the kept token from (passed on to it as --home).
    #[arg(long, env = "VIGIL_HOME")]
    pub home: Option<PathBuf>,
}

/// Why a kubeconfig cannot be written or a credential not handed out.
#[derive(Debug)]
pub enum KubeError {
    ClusterName(String),
    Server(String, &'static str),
    File(PathBuf, std::io::Error),
    NotPem(PathBuf),
    /// `--output` names a file that is not JSON (a YAML kubeconfig): refused, not rewritten.
    NotJson(PathBuf, String),
    BadKubeconfig(PathBuf, &'static str),
    Token(String),
    /// No token kept: `vigil login` has not run (or its token was removed).
    NoToken(PathBuf),
    /// The kept token has expired (at this RFC 3339 time).
    Expired(String),
    /// The token given for --static-token has expired.
    GivenExpired(String),
    NoExpiry(PathBuf),
    Executable(String),
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClusterName(name) => write!(
                f,
                "cluster name {name:?}: use letters, digits, '-', '_' and '.' only (it is a path segment)"
            ),
            Self::Server(server, why) => write!(f, "--server {server:?}: {why}"),
            Self::File(path, e) => write!(f, "{}: {e}", path.display()),
            Self::NotPem(path) => write!(f, "{}: not a PEM certificate", path.display()),
            Self::NotJson(path, why) => write!(
                f,
                "{} is not a JSON kubeconfig ({why}). vigil writes kubeconfigs as JSON and does \
                 not rewrite YAML: give --output a file of its own (say ~/.kube/vigil.json) and \
                 list both in KUBECONFIG (export KUBECONFIG=~/.kube/config:~/.kube/vigil.json); \
                 kubectl merges them",
                path.display()
            ),
            Self::BadKubeconfig(path, why) => write!(f, "{}: {why}", path.display()),
            Self::Token(why) => write!(f, "the token: {why}"),
            Self::NoToken(path) => write!(f, "no token in {}: run vigil login", path.display()),
            Self::Expired(at) => write!(
                f,
                "the token of the last vigil login expired at {at}: run vigil login again"
            ),
            Self::GivenExpired(at) => write!(f, "the token expired at {at}: give a new one"),
            Self::NoExpiry(path) => write!(
                f,
                "the token in {} has no expiry (exp) a client could cache it by: run vigil login again",
                path.display()
            ),
            Self::Executable(why) => write!(f, "the path of the vigil executable: {why}"),
        }
    }
}

impl std::error::Error for KubeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::File(_, e) => Some(e),
            _ => None,
        }
    }
}

/// How the kubeconfig's user gets its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// client-go runs `COMMAND kube-credential [--home HOME]` (absolute paths).
    Exec {
        command: String,
        home: Option<String>,
    },
    /// The token itself.
    Static(String),
}

/// `https://HOST:PORT/clusters/NAME`, from the listener's URL and the cluster's name.
pub fn cluster_url(server: &str, cluster: &str) -> Result<String, KubeError> {
    let name_ok = !cluster.is_empty()
        && cluster != "."
        && cluster != ".."
        && cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(KubeError::ClusterName(cluster.into()));
    }
    let bad = |why| KubeError::Server(server.into(), why);
    let url = reqwest::Url::parse(server).map_err(|_| bad("not a URL"))?;
    // The listener is TLS only, and the token must not cross a network in clear.
    if url.scheme() != "https" {
        return Err(bad(
            "must be an https:// URL (the gateway's listener is TLS)",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad(
            "must be https://HOST:PORT, with no query, fragment or user",
        ));
    }
    // A gateway published under a path of its own (a reverse proxy) keeps that path.
    let base = url.as_str().trim_end_matches('/');
    Ok(format!("{base}{CLUSTER_PREFIX}{cluster}"))
}

/// The name of the cluster, user and context entries for a gateway cluster.
pub fn entry_name(cluster: &str) -> String {
    format!("vigil-{cluster}")
}

/// A kubeconfig with one cluster, user and context, all named `vigil-CLUSTER`, that is the
/// current context.
pub fn kubeconfig(
    cluster: &str,
    server_url: &str,
    ca_pem: Option<&[u8]>,
    credential: &Credential,
) -> Value {
    let name = entry_name(cluster);
    let mut cluster_entry = Map::new();
    cluster_entry.insert("server".into(), server_url.into());
    if let Some(pem) = ca_pem {
        cluster_entry.insert(
            "certificate-authority-data".into(),
            base64::engine::general_purpose::STANDARD.encode(pem).into(),
        );
    }
    let user = match credential {
        Credential::Exec { command, home } => {
            let mut args = vec![Value::from("kube-credential")];
            if let Some(home) = home {
                args.extend(["--home".into(), home.as_str().into()]);
            }
            json!({ "exec": {
                "apiVersion": EXEC_API_VERSION,
                "command": command,
                "args": args,
                "env": null,
                "installHint": "this kubeconfig runs vigil, the Vigil CLI: install it, then run vigil login",
                // The plugin never prompts: when the kept token is gone it says "run vigil
                // login" on stderr and fails.
                "interactiveMode": "Never",
                "provideClusterInfo": false,
            }})
        }
        Credential::Static(token) => json!({ "token": token }),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{ "name": name, "cluster": cluster_entry }],
        "users": [{ "name": name, "user": user }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": name } }],
        "current-context": name,
    })
}

/// Merges the entries of `new` (a kubeconfig from [`kubeconfig`]) into `existing`: an entry of
/// the same name is replaced, every other entry and field is kept. The current context is set
/// only where there was none.
pub fn merge(existing: Value, new: &Value) -> Result<Value, &'static str> {
    let Value::Object(mut config) = existing else {
        return Err("not a JSON object");
    };
    if config.get("kind").is_some_and(|k| k != "Config") {
        return Err("its kind is not Config");
    }
    for list in ["clusters", "users", "contexts"] {
        let mut entries = match config.remove(list) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err("clusters, users and contexts must be lists"),
        };
        for added in new[list].as_array().into_iter().flatten() {
            entries.retain(|e| e.get("name") != added.get("name"));
            entries.push(added.clone());
        }
        config.insert(list.into(), Value::Array(entries));
    }
    config.entry("apiVersion").or_insert_with(|| "v1".into());
    config.entry("kind").or_insert_with(|| "Config".into());
    let current = config.get("current-context").and_then(Value::as_str);
    if current.is_none_or(str::is_empty) {
        config.insert("current-context".into(), new["current-context"].clone());
    }
    Ok(Value::Object(config))
}

fn read(path: &Path) -> Result<Vec<u8>, KubeError> {
    std::fs::read(path).map_err(|e| KubeError::File(path.into(), e))
}

/// An absolute path (kubectl runs the plugin from wherever it is started), as UTF-8 for JSON.
fn absolute(path: &Path) -> Result<String, KubeError> {
    let abs = std::path::absolute(path).map_err(|e| KubeError::File(path.into(), e))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| KubeError::Executable(format!("{} is not UTF-8", abs.display())))
}

/// `vigil kubeconfig`: the kubeconfig to print, or, with `--output`, what was written where.
pub fn run_kubeconfig(args: &KubeconfigArgs) -> Result<String, KubeError> {
    let url = cluster_url(&args.server, &args.cluster)?;
    let ca = match &args.ca {
        Some(path) => {
            let pem = read(path)?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(KubeError::NotPem(path.clone()));
            }
            Some(pem)
        }
        None => None,
    };
    let mut notes = String::new();
    let credential = if args.static_token {
        let token = args
            .token
            .get_in(args.home.as_deref())
            .map_err(KubeError::Token)?;
        let exp = crate::login::unverified_claims(&token)
            .map_err(KubeError::Token)?
            .get("exp")
            .and_then(Value::as_u64);
        match exp {
            Some(exp) if exp <= now() => return Err(KubeError::GivenExpired(rfc3339(exp))),
            Some(exp) => {
                notes += &format!(
                    "the token in this kubeconfig expires at {}: write it again with a new token then\n",
                    rfc3339(exp)
                )
            }
            None => notes += "the token has no expiry (exp)\n",
        }
        Credential::Static(token)
    } else {
        let exe = std::env::current_exe().map_err(|e| KubeError::Executable(e.to_string()))?;
        Credential::Exec {
            command: absolute(&exe)?,
            home: args.home.as_deref().map(absolute).transpose()?,
        }
    };
    let new = kubeconfig(&args.cluster, &url, ca.as_deref(), &credential);
    let Some(output) = &args.output else {
        eprint!("{notes}");
        return Ok(pretty(&new));
    };
    // Through a symlink (a kubeconfig kept elsewhere), to the file it names.
    let output = std::fs::canonicalize(output).unwrap_or_else(|_| output.clone());
    let merged = match std::fs::read(&output) {
        Ok(text) if text.iter().all(u8::is_ascii_whitespace) => new,
        Ok(text) => {
            let existing: Value = serde_json::from_slice(&text)
                .map_err(|e| KubeError::NotJson(output.clone(), e.to_string()))?;
            merge(existing, &new).map_err(|why| KubeError::BadKubeconfig(output.clone(), why))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new,
        Err(e) => return Err(KubeError::File(output, e)),
    };
    vigil_node::core::secret::write_private_file(&output, pretty(&merged).as_bytes())
        .map_err(|e| KubeError::File(output.clone(), e))?;
    let name = entry_name(&args.cluster);
    Ok(format!(
        "{notes}cluster, user and context {name} ({url}) written to {}; current context: {}\n",
        output.display(),
        merged["current-context"].as_str().unwrap_or("-"),
    ))
}

fn pretty(config: &Value) -> String {
    let mut text = serde_json::to_string_pretty(config).unwrap_or_default();
    text.push('\n');
    text
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `2026-12-03T07:15:47Z`: the form client-go parses (`metav1.Time`, RFC 3339).
fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// The ExecCredential client-go expects from the plugin: the token and when it expires, so
/// that client-go uses it until then and runs the plugin again after. An expired token or one
/// without expiry is refused: client-go would cache it and the gateway would refuse it.
pub fn exec_credential(token: &str, now: u64, source: &Path) -> Result<Value, KubeError> {
    let exp = crate::login::unverified_claims(token)
        .ok()
        .and_then(|c| c.get("exp").and_then(Value::as_u64))
        .ok_or_else(|| KubeError::NoExpiry(source.into()))?;
    if exp <= now {
        return Err(KubeError::Expired(rfc3339(exp)));
    }
    Ok(json!({
        "apiVersion": EXEC_API_VERSION,
        "kind": "ExecCredential",
        "status": { "token": token, "expirationTimestamp": rfc3339(exp) },
    }))
}

/// `vigil kube-credential`: the ExecCredential JSON for the token `vigil login` kept in `home`.
pub fn run_kube_credential(home: Option<&Path>) -> Result<String, KubeError> {
    let home = vigil_home(home).map_err(KubeError::Token)?;
    let path = crate::login::token_path(home);
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => return Err(KubeError::NoToken(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KubeError::NoToken(path)),
        Err(e) => return Err(KubeError::File(path, e)),
    };
    let credential = exec_credential(&token, now(), &path)?;
    Ok(format!("{credential}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unsigned JWT with these claims (the CLI reads claims without verifying them).
    fn jwt(claims: Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"signature")
        )
    }

    fn plugin() -> Credential {
        Credential::Exec {
            command: "/usr/local/bin/vigil".into(),
            home: None,
        }
    }

    #[test]
    fn t10_cluster_url_appends_the_prefix() {
        let url = |s: &str, c: &str| cluster_url(s, c).map_err(|e| e.to_string());
        assert_eq!(
            url("https://gw.example:6443", "prod").unwrap(),
            "https://gw.example:6443/clusters/prod"
        );
        assert_eq!(
            url("https://gw.example:6443/", "a_b.c-1").unwrap(),
            "https://gw.example:6443/clusters/a_b.c-1"
        );
        assert_eq!(
            url("https://127.0.0.1:6443/vigil/", "x").unwrap(),
            "https://127.0.0.1:6443/vigil/clusters/x"
        );
        for bad in ["", ".", "..", "a/b", "a b", "a%2Fb", "ü"] {
            assert!(
                matches!(
                    cluster_url("https://gw:1", bad),
                    Err(KubeError::ClusterName(_))
                ),
                "{bad:?}"
            );
        }
        for bad in [
            "http://gw:6443",
            "gw:6443",
            "https://gw:6443?x=1",
            "https://u:p@gw:6443",
            "not a url",
        ] {
            assert!(
                matches!(cluster_url(bad, "x"), Err(KubeError::Server(..))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn t11_exec_plugin_kubeconfig_shape() {
        let config = kubeconfig(
            "prod",
            "https://gw:6443/clusters/prod",
            Some(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            &Credential::Exec {
                command: "/opt/vigil/bin/vigil".into(),
                home: Some("/home/a/.vigil".into()),
            },
        );
        assert_eq!(config["apiVersion"], "v1");
        assert_eq!(config["kind"], "Config");
        assert_eq!(config["current-context"], "vigil-prod");
        let cluster = &config["clusters"][0];
        assert_eq!(cluster["name"], "vigil-prod");
        assert_eq!(
            cluster["cluster"]["server"],
            "https://gw:6443/clusters/prod"
        );
        let ca = base64::engine::general_purpose::STANDARD
            .decode(
                cluster["cluster"]["certificate-authority-data"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        assert!(ca.starts_with(b"-----BEGIN CERTIFICATE-----"));
        let user = &config["users"][0];
        assert_eq!(user["name"], "vigil-prod");
        let exec = &user["user"]["exec"];
        assert_eq!(exec["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(exec["command"], "/opt/vigil/bin/vigil");
        assert_eq!(
            exec["args"],
            json!(["kube-credential", "--home", "/home/a/.vigil"])
        );
        assert_eq!(exec["interactiveMode"], "Never");
        assert_eq!(exec["provideClusterInfo"], false);
        assert!(user["user"].get("token").is_none());
        assert_eq!(
            config["contexts"][0],
            json!({"name": "vigil-prod", "context": {"cluster": "vigil-prod", "user": "vigil-prod"}})
        );
        // Without --home the plugin finds its home itself; without --ca, the system's roots.
        let plain = kubeconfig("p", "https://gw:1/clusters/p", None, &plugin());
        assert_eq!(
            plain["users"][0]["user"]["exec"]["args"],
            json!(["kube-credential"])
        );
        assert!(plain["clusters"][0]["cluster"]
            .get("certificate-authority-data")
            .is_none());
    }

    #[test]
    fn t12_static_token_kubeconfig_shape() {
        let config = kubeconfig(
            "ci",
            "https://gw:1/clusters/ci",
            None,
            &Credential::Static("a.b.c".into()),
        );
        assert_eq!(
            config["users"][0],
            json!({"name": "vigil-ci", "user": {"token": "a.b.c"}})
        );
    }

    #[test]
    fn t20_merge_keeps_other_entries_and_replaces_its_own() {
        let existing = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {"colors": true},
            "clusters": [
                {"name": "kind-dev", "cluster": {"server": "https://127.0.0.1:40000"}},
                {"name": "vigil-prod", "cluster": {"server": "https://old:1/clusters/prod"}}
            ],
            "users": [{"name": "kind-dev", "user": {"client-certificate-data": "AAAA"}}],
            "contexts": [{"name": "kind-dev", "context": {"cluster": "kind-dev", "user": "kind-dev"}}],
            "current-context": "kind-dev",
            "extensions": [{"name": "x", "extension": {"k": 1}}]
        });
        let new = kubeconfig("prod", "https://gw:6443/clusters/prod", None, &plugin());
        let merged = merge(existing.clone(), &new).unwrap();
        // Others kept, untouched; the current context stays the user's.
        assert_eq!(merged["current-context"], "kind-dev");
        assert_eq!(merged["preferences"], existing["preferences"]);
        assert_eq!(merged["extensions"], existing["extensions"]);
        assert_eq!(merged["clusters"][0], existing["clusters"][0]);
        assert_eq!(merged["users"][0], existing["users"][0]);
        assert_eq!(merged["contexts"][0], existing["contexts"][0]);
        // Ours replaced, not duplicated.
        for list in ["clusters", "users", "contexts"] {
            let ours: Vec<_> = merged[list]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "vigil-prod")
                .collect();
            assert_eq!(ours.len(), 1, "{list}");
            assert_eq!(*ours[0], new[list][0], "{list}");
        }
        assert_eq!(merged["clusters"].as_array().unwrap().len(), 2);
        // Merging again changes nothing.
        assert_eq!(merge(merged.clone(), &new).unwrap(), merged);
    }

    #[test]
    fn t21_merge_into_a_config_without_entries_sets_the_context() {
        let new = kubeconfig("prod", "https://gw:6443/clusters/prod", None, &plugin());
        let merged = merge(json!({"clusters": null, "current-context": ""}), &new).unwrap();
        assert_eq!(merged["current-context"], "vigil-prod");
        assert_eq!(merged["kind"], "Config");
        assert_eq!(merged["users"], new["users"]);
        assert!(merge(json!([]), &new).is_err());
        assert!(merge(json!({"kind": "Pod"}), &new).is_err());
        assert!(merge(json!({"users": {}}), &new).is_err());
    }

    #[test]
    fn t22_output_merges_json_and_refuses_yaml() {
        let dir = std::env::temp_dir().join(format!("vigil-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config");
        let args = |output: &Path| KubeconfigArgs {
            cluster: "prod".into(),
            server: "https://gw:6443".into(),
            ca: None,
            static_token: false,
            token: TokenArgs {
                token: None,
                token_file: None,
            },
            output: Some(output.into()),
            home: Some(dir.join("home")),
        };
        // A new file: created 0600, with the current context.
        let _ = std::fs::remove_file(&file);
        run_kubeconfig(&args(&file)).unwrap();
        let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(written["current-context"], "vigil-prod");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let args_home = written["users"][0]["user"]["exec"]["args"][2]
            .as_str()
            .unwrap();
        assert!(Path::new(args_home).is_absolute());
        // A YAML kubeconfig is left as it is.
        let yaml = dir.join("config.yaml");
        let text = "apiVersion: v1\nkind: Config\nclusters: []\n";
        std::fs::write(&yaml, text).unwrap();
        let err = run_kubeconfig(&args(&yaml)).unwrap_err();
        assert!(matches!(err, KubeError::NotJson(..)), "{err}");
        assert!(err.to_string().contains("KUBECONFIG"));
        assert_eq!(std::fs::read_to_string(&yaml).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn t30_exec_credential_carries_the_token_and_its_expiry() {
        let exp = 1_800_000_000; // 2027-01-15T08:00:00Z
        let token = jwt(json!({"sub": "alice", "exp": exp}));
        let cred = exec_credential(&token, exp - 60, Path::new("token")).unwrap();
        assert_eq!(
            cred,
            json!({
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": {"token": token, "expirationTimestamp": "2027-01-15T08:00:00Z"}
            })
        );
    }

    #[test]
    fn t31_expired_or_unexpiring_token_refused() {
        let exp = 1_800_000_000;
        let token = jwt(json!({"sub": "alice", "exp": exp}));
        for now in [exp, exp + 1] {
            let err = exec_credential(&token, now, Path::new("t")).unwrap_err();
            assert!(matches!(err, KubeError::Expired(_)), "{err}");
            assert!(err.to_string().contains("run vigil login"));
        }
        for token in [jwt(json!({"sub": "alice"})), "opaque".into()] {
            let err = exec_credential(&token, 0, Path::new("t")).unwrap_err();
            assert!(matches!(err, KubeError::NoExpiry(_)), "{err}");
        }
    }

    #[test]
    fn t32_kube_credential_reads_the_kept_token() {
        let home = std::env::temp_dir().join(format!("vigil-kube-cred-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        let err = run_kube_credential(Some(&home)).unwrap_err();
        assert!(matches!(err, KubeError::NoToken(_)), "{err}");
        assert!(err.to_string().contains("run vigil login"));

        let fresh = jwt(json!({"sub": "alice", "exp": now() + 600}));
        std::fs::write(home.join("token"), format!("{fresh}\n")).unwrap();
        let out: Value = serde_json::from_str(&run_kube_credential(Some(&home)).unwrap()).unwrap();
        assert_eq!(out["status"]["token"], fresh.as_str());

        let stale = jwt(json!({"sub": "alice", "exp": now() - 1}));
        std::fs::write(home.join("token"), format!("{stale}\n")).unwrap();
        let err = run_kube_credential(Some(&home)).unwrap_err();
        assert!(matches!(err, KubeError::Expired(_)), "{err}");
        std::fs::remove_dir_all(&home).unwrap();
    }
}
