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
    /// Log in with this token (an agent's client-credentials token) instead of as a person.
    /// Prefer VIGIL_TOKEN or --token-file: a command line is visible to other users.
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A person on a box with no browser: a URL and a code to enter on any other device
    /// (the OAuth device authorization grant).
    #[arg(long, conflicts_with_all = ["token", "token_file", "no_browser"])]
    pub device: bool,
    /// Print the login URL instead of opening a browser (open it on this machine: the
    /// provider sends the browser back to a port on 127.0.0.1).
    #[arg(long)]
    pub no_browser: bool,
    /// The loopback port the browser is sent back to (0: any free port; the provider must
    /// register the client as a native app, RFC 8252, or this exact port).
    #[arg(long, default_value_t = 0)]
    pub callback_port: u16,
    /// Sign in at the organisation's SAML identity provider (through the gateway's console)
    /// instead of its OIDC provider; the gateway issues the token.
    #[arg(long, conflicts_with_all = ["token", "token_file", "device"])]
    pub saml: bool,
}

/// Where a command finds the caller's token: given, or the one `vigil login` kept.
#[derive(clap::Args)]
pub struct TokenArgs {
    /// The token (default: the one the last `vigil login` kept).
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub token: TokenArgs,
}

impl TokenArgs {
    fn get(&self, gateway: &GatewayArgs) -> Result<String, String> {
        self.get_in(gateway.home.as_deref())
    }

    /// The token given, else the one `vigil login` kept in the Vigil home (`home`, or the
    /// default one).
    pub fn get_in(&self, home: Option<&Path>) -> Result<String, String> {
        match (&self.token_file, &self.token) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("{}: {e}", f.display())),
            (None, Some(t)) => Ok(t.trim().to_string()),
            (None, None) => cached_token(&vigil_home(home)?),
        }
    }
}

/// The Vigil home: given, or `~/.vigil`.
pub fn vigil_home(given: Option<&Path>) -> Result<PathBuf, String> {
    match given {
        Some(h) => Ok(h.to_path_buf()),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".vigil"))
            .ok_or_else(|| "HOME is not set: give --home".into()),
    }
}

/// The token the last `vigil login` kept, while it is valid.
pub fn cached_token(home: &Path) -> Result<String, String> {
    let path = crate::login::token_path(home.to_path_buf());
    let token = std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|_| "no token: run vigil login (or give --token)".to_string())?;
    let exp = crate::login::unverified_claims(&token)?["exp"].as_u64();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    match exp {
        Some(exp) if exp > now => Ok(token),
        _ => Err("the token of the last login has expired: run vigil login again".into()),
    }
}

impl GatewayArgs {
    pub fn home(&self) -> Result<PathBuf, String> {
        vigil_home(self.home.as_deref())
    }

    fn key_path(&self) -> Result<PathBuf, String> {
        Ok(self.home()?.join("ssh").join("id_ed25519"))
    }

    /// A client for the gateway's API: HTTPS only (the calls carry tokens, and answer with
    /// certificates and tokens), redirects included.
    fn client(&self) -> Result<reqwest::Client, String> {
        if !self.gateway.to_ascii_lowercase().starts_with("https://") {
            return Err(format!(
                "--gateway {}: must be an https:// URL (the gateway's API is TLS, and a token \
                 must not cross a network in clear)",
                crate::display::escape(&self.gateway)
            ));
        }
        let mut b = reqwest::Client::builder()
            .https_only(true)
            .timeout(std::time::Duration::from_secs(30));
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

/// Calls the gateway's API (as the token's principal, when there is one); its JSON answer,
/// or its status and error message.
async fn request(
    gateway: &GatewayArgs,
    token: Option<&str>,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, (reqwest::StatusCode, String)> {
    let client = gateway
        .client()
        .map_err(|e| (reqwest::StatusCode::BAD_REQUEST, e))?;
    let mut request = match body {
        Some(b) => client.post(gateway.url(path)).json(&b),
        None => client.get(gateway.url(path)),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let unreachable = reqwest::StatusCode::SERVICE_UNAVAILABLE;
    let resp = request.send().await.map_err(|e| {
        (
            unreachable,
            format!("the gateway at {}: {e}", gateway.gateway),
        )
    })?;
    let status = resp.status();
    let json: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| (status, format!("the gateway's answer ({status}): {e}")))?;
    if status.is_success() {
        Ok(json)
    } else {
        let why = json["error"].as_str().unwrap_or("no reason given");
        Err((status, format!("the gateway refused ({status}): {why}")))
    }
}

/// An unauthenticated call (what the gateway tells anyone).
pub async fn get(gateway: &GatewayArgs, path: &str) -> Result<serde_json::Value, String> {
    request(gateway, None, path, None).await.map_err(|(_, e)| e)
}

/// An unauthenticated `POST` of `body`.
pub async fn post(
    gateway: &GatewayArgs,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    request(gateway, None, path, Some(body))
        .await
        .map_err(|(_, e)| e)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
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

/// `vigil login`: a token (the agent's own, or a person's from the provider), kept in the
/// Vigil home, and a certificate for the local key valid no longer than the token when the
/// gateway has an SSH listener.
pub fn login(args: &LoginArgs) -> Result<String, String> {
    let home = args.gateway.home()?;
    runtime()?.block_on(async {
        let token = match (&args.token_file, &args.token) {
            (None, None) if args.saml => {
                crate::login::saml(&args.gateway, !args.no_browser, args.callback_port).await?
            }
            (None, None) => {
                let flow = if args.device {
                    crate::login::Flow::Device
                } else {
                    crate::login::Flow::Browser {
                        open_browser: !args.no_browser,
                        callback_port: args.callback_port,
                    }
                };
                crate::login::person(&args.gateway, flow).await?
            }
            _ => TokenArgs {
                token: args.token.clone(),
                token_file: args.token_file.clone(),
            }
            .get(&args.gateway)?,
        };
        let claims = crate::login::unverified_claims(&token).unwrap_or_default();
        let who = claims["sub"].as_str().unwrap_or("?").to_string();
        let mut out = format!(
            "logged in as {} until {}\n",
            crate::display::escape(&who),
            crate::time(claims["exp"].as_u64().unwrap_or(0).saturating_mul(1000))
        );
        let path = args.gateway.key_path()?;
        let key = key_pair(&path)?;
        let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
        let body = serde_json::json!({ "public_key": public });
        match request(
            &args.gateway,
            Some(&token),
            "/v1/ssh/certificate",
            Some(body),
        )
        .await
        {
            Ok(answer) => {
                let cert = answer["certificate"]
                    .as_str()
                    .ok_or("the gateway's answer has no certificate")?;
                std::fs::write(cert_path(&path), format!("{cert}\n")).map_err(|e| e.to_string())?;
                let until = answer["valid_before"].as_u64().unwrap_or(0);
                out += &format!(
                    "certificate {} for key {} valid until {}\n",
                    cert_path(&path).display(),
                    path.display(),
                    crate::time(until.saturating_mul(1000))
                );
            }
            // No SSH on this gateway: the token is all there is to keep.
            Err((reqwest::StatusCode::NOT_FOUND, _)) => {}
            Err((_, why)) => return Err(why),
        }
        vigil_node::core::secret::write_private_file(
            &crate::login::token_path(home),
            format!("{token}\n").as_bytes(),
        )
        .map_err(|e| format!("cannot keep the token: {e}"))?;
        Ok(out)
    })
}

/// `vigil ssh-config`: a `Host` block per host and login the token's principal may use, and
/// a known-hosts file that pins the gateway's host key.
pub fn ssh_config(args: &SshConfigArgs) -> Result<String, String> {
    let token = args.token.get(&args.gateway)?;
    let answer = runtime()?
        .block_on(request(&args.gateway, Some(&token), "/v1/ssh/hosts", None))
        .map_err(|(_, e)| e)?;
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
