//! `vigil login` and `vigil ssh-config`: a key pair held locally, a short-lived certificate for
//! it from a gateway, and the OpenSSH configuration that uses them (stock `ssh`, `scp`, `sftp`
//! and `rsync` then work with no wrapper).

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The gateway's API (`https://host:port`, its `[api] listen`).
    #[arg(long, env = "VIGIL_GATEWAY")]
    pub gateway: String,
    /// A PEM file of the CA (or the self-signed certificate) the gateway's API presents;
    /// default: the system's roots.
    #[arg(long, env = "VIGIL_GATEWAY_CA")]
    pub gateway_ca: Option<PathBuf>,
    /// Where the key, the certificate and the known hosts file are kept.
    #[arg(long, env = "VIGIL_HOME")]
    pub home: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// The access token to log in with (an agent's client-credentials token). Prefer
    /// VIGIL_TOKEN or --token-file: a command line is visible to other users.
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// The token whose hosts to list (the one `vigil login` used).
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

fn token(inline: &Option<String>, file: &Option<PathBuf>) -> Result<String, String> {
    match (file, inline) {
        (Some(f), _) => std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{}: {e}", f.display())),
        (None, Some(t)) => Ok(t.trim().to_string()),
        (None, None) => Err("give the token with --token, VIGIL_TOKEN or --token-file".into()),
    }
}

impl GatewayArgs {
    fn home(&self) -> Result<PathBuf, String> {
        match &self.home {
            Some(h) => Ok(h.clone()),
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".vigil"))
                .ok_or_else(|| "HOME is not set: give --home".into()),
        }
    }

    fn key_path(&self) -> Result<PathBuf, String> {
        Ok(self.home()?.join("ssh").join("id_ed25519"))
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
        if let Some(ca) = &self.gateway_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        b.build().map_err(|e| e.to_string())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.trim_end_matches('/'))
    }
}

/// Calls the gateway's API; its JSON answer, or its error message.
fn call(
    gateway: &GatewayArgs,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let client = gateway.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let request = match body {
            Some(b) => client.post(gateway.url(path)).json(&b),
            None => client.get(gateway.url(path)),
        };
        let resp = request
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("the gateway at {}: {e}", gateway.gateway))?;
        let status = resp.status();
        let json: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("the gateway's answer ({status}): {e}"))?;
        if status.is_success() {
            Ok(json)
        } else {
            Err(format!(
                "the gateway refused ({status}): {}",
                json["error"].as_str().unwrap_or("no reason given")
            ))
        }
    })
}

/// The local key pair, created once (mode 0600).
fn key_pair(path: &Path) -> Result<PrivateKey, String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_openssh(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("vigil");
    let pem = key.to_openssh(LineEnding::LF).map_err(|e| e.to_string())?;
    vigil_node::core::secret::write_private_file(path, pem.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// The certificate file next to the key (`id_ed25519-cert.pub`, where OpenSSH looks).
fn cert_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push("-cert.pub");
    key.with_file_name(name)
}

/// `vigil login --token`: a certificate for the local key, valid no longer than the token.
pub fn login(args: &LoginArgs) -> Result<String, String> {
    let token = token(&args.token, &args.token_file)?;
    let path = args.gateway.key_path()?;
    let key = key_pair(&path)?;
    let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
    let answer = call(
        &args.gateway,
        &token,
        "/v1/ssh/certificate",
        Some(serde_json::json!({ "public_key": public })),
    )?;
    let cert = answer["certificate"]
        .as_str()
        .ok_or("the gateway's answer has no certificate")?;
    std::fs::write(cert_path(&path), format!("{cert}\n")).map_err(|e| e.to_string())?;
    let until = answer["valid_before"].as_u64().unwrap_or(0);
    Ok(format!(
        "certificate {} for key {} valid until {}\n",
        cert_path(&path).display(),
        path.display(),
        crate::time(until.saturating_mul(1000))
    ))
}

/// `vigil ssh-config`: a `Host` block per host and login the token's principal may use, and
/// a known-hosts file that pins the gateway's host key.
pub fn ssh_config(args: &SshConfigArgs) -> Result<String, String> {
    let token = token(&args.token, &args.token_file)?;
    let answer = call(&args.gateway, &token, "/v1/ssh/hosts", None)?;
    let key = args.gateway.key_path()?;
    let known_hosts = key.with_file_name("known_hosts");
    let host = reqwest::Url::parse(&args.gateway.gateway)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .ok_or("--gateway is not a URL with a host")?;
    let port = answer["port"].as_u64().ok_or("no SSH port in the answer")?;
    let host_key = answer["host_key"]
        .as_str()
        .ok_or("no host key in the answer")?;
    let separator = answer["separator"].as_str().unwrap_or("+");
    // One alias for the gateway's key, whatever name a Host block uses.
    std::fs::write(&known_hosts, format!("vigil-gateway {host_key}\n"))
        .map_err(|e| format!("{}: {e}", known_hosts.display()))?;
    let mut out = String::new();
    for h in answer["hosts"].as_array().into_iter().flatten() {
        let name = h["name"].as_str().unwrap_or_default();
        let logins: Vec<&str> = h["logins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            // A pattern (`*`, `app-*`) admits logins; it is not one to log in as.
            .filter(|l| !l.contains(['*', '?', '[']))
            .collect();
        // The block logs in as the first login; `ssh -l LOGIN+NAME NAME` picks another.
        if logins.len() > 1 {
            out += &format!(
                "# {name}: also {}\n",
                logins[1..]
                    .iter()
                    .map(|l| format!("ssh -l '{l}{separator}{name}' {name}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(login) = logins.first() {
            out += &format!(
                "Host {name}\n    HostName {host}\n    Port {port}\n    User {login}{separator}{name}\n    IdentityFile {key}\n    CertificateFile {cert}\n    IdentitiesOnly yes\n    HostKeyAlias vigil-gateway\n    UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n\n",
                key = key.display(),
                cert = cert_path(&key).display(),
                known = known_hosts.display(),
            );
        }
    }
    Ok(out)
}
