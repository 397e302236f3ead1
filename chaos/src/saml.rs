//! A real SAML identity provider for tests: SimpleSAMLphp on loopback, started by
//! `deploy/dev/saml/idp.sh` with the SP metadata a test gives it (the node's own, served at
//! `/saml/metadata`). Users alice, bob, dave and agent-saml, password `dev`.
//!
//! Also what an attacker (or a misbehaving IdP) would do with a response: sign it again with
//! a key (xmlsec1, the same library family the node verifies with, used here as the IdP would).

use crate::{repo_root, run};
use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Idp {
    dir: tempfile::TempDir,
    pub port: u16,
    /// `http://127.0.0.1:PORT/simplesaml/saml2/idp/metadata.php` (also its entity id).
    pub metadata_url: String,
}

fn idp_sh(args: &[&str]) -> String {
    run(Command::new(repo_root().join("deploy/dev/saml/idp.sh")).args(args))
}

impl Idp {
    /// Starts an IdP that knows the SP of `sp_metadata` (XML).
    pub fn start(sp_metadata: &str) -> Self {
        let mut idp = Self {
            metadata_url: String::new(),
            dir: tempfile::tempdir().unwrap(),
            port: crate::free_port(),
        };
        idp.metadata_url = idp.register(sp_metadata);
        idp
    }

    /// (Re)registers the SP at the running IdP; the IdP's metadata URL.
    pub fn register(&self, sp_metadata: &str) -> String {
        let file = self.dir.path().join("sp.xml");
        std::fs::write(&file, sp_metadata).unwrap();
        idp_sh(&[
            "start",
            self.dir.path().join("idp").to_str().unwrap(),
            &self.port.to_string(),
            file.to_str().unwrap(),
        ])
    }

    /// The IdP's signing key and certificate (PEM files).
    pub fn key(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join("idp");
        (d.join("idp.key"), d.join("idp.crt"))
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("deploy/dev/saml/idp.sh"))
            .args(["stop", self.dir.path().join("idp").to_str().unwrap()])
            .output();
    }
}

/// A cookie jar of one host, enough for SimpleSAMLphp's session cookies.
#[derive(Default)]
struct Jar(Vec<(String, String)>);

impl Jar {
    fn take(&mut self, res: &reqwest::Response) {
        for v in res.headers().get_all(reqwest::header::SET_COOKIE) {
            let Some((name, value)) = v
                .to_str()
                .ok()
                .and_then(|v| v.split(';').next())
                .and_then(|kv| kv.split_once('='))
            else {
                continue;
            };
            self.0.retain(|(n, _)| n != name);
            self.0
                .push((name.trim().to_string(), value.trim().to_string()));
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The value of the hidden input `name` in an HTML page.
pub fn form_field(page: &str, name: &str) -> Option<String> {
    let at = page.find(&format!("name=\"{name}\""))?;
    let tag_start = page[..at].rfind('<')?;
    let tag_end = at + page[at..].find('>')?;
    let tag = &page[tag_start..tag_end];
    let v = tag.split("value=\"").nth(1)?.split('"').next()?;
    Some(
        v.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&#039;", "'")
            .replace("&amp;", "&"),
    )
}

/// Signs in at the IdP as `user` (password `dev`) following `sso_url` (the AuthnRequest the
/// node redirected to); the base64 `SAMLResponse` the IdP's page would post.
pub async fn sign_in(sso_url: &str, user: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut jar = Jar::default();
    let mut url = sso_url.to_string();
    let page = loop {
        let res = http
            .get(&url)
            .header("cookie", jar.header())
            .send()
            .await
            .unwrap();
        jar.take(&res);
        match res.headers().get("location") {
            Some(next) => {
                let next = next.to_str().unwrap();
                url = reqwest::Url::parse(&url)
                    .unwrap()
                    .join(next)
                    .unwrap()
                    .to_string();
            }
            None => break res.text().await.unwrap(),
        }
    };
    let state = form_field(&page, "AuthState").unwrap_or_else(|| panic!("no login form: {page}"));
    let res = http
        .post(&url)
        .header("cookie", jar.header())
        .form(&[
            ("username", user),
            ("password", "dev"),
            ("AuthState", state.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let page = res.text().await.unwrap();
    form_field(&page, "SAMLResponse").unwrap_or_else(|| panic!("no SAMLResponse: {page}"))
}

/// An AuthnRequest from the SP `issuer` whose assertion consumer is `acs` (here: another SP
/// the IdP knows, such as a token endpoint), sent by HTTP-Redirect to the IdP's SSO service:
/// the URL to follow.
pub fn authn_request_url(sso: &str, issuer: &str, acs: &str) -> String {
    use std::io::Write as _;
    let id = format!("_{}", crate::random_suffix());
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let xml = format!(
        r#"<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="{id}" Version="2.0" IssueInstant="{now}" Destination="{sso}" AssertionConsumerServiceURL="{acs}" ProtocolBinding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"><saml:Issuer>{issuer}</saml:Issuer></samlp:AuthnRequest>"#
    );
    let mut deflate =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    deflate.write_all(xml.as_bytes()).unwrap();
    let request = base64::engine::general_purpose::STANDARD.encode(deflate.finish().unwrap());
    let mut url = reqwest::Url::parse(sso).unwrap();
    url.query_pairs_mut().append_pair("SAMLRequest", &request);
    url.to_string()
}

/// The signed `saml:Assertion` of a response's XML, standing alone (the namespace its prefix
/// was declared with on the response, declared on it: exclusive canonicalisation, which the
/// signature uses, renders it the same).
pub fn assertion_of(response_xml: &str) -> String {
    let start = response_xml.find("<saml:Assertion").unwrap();
    let end = response_xml.find("</saml:Assertion>").unwrap() + "</saml:Assertion>".len();
    response_xml[start..end].replacen(
        "<saml:Assertion",
        r#"<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion""#,
        1,
    )
}

/// The XML of a base64 `SAMLResponse`, and back.
pub fn decode(response: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response.split_ascii_whitespace().collect::<String>())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

pub fn encode(xml: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(xml)
}

const ID_ATTRS: [&str; 4] = [
    "--id-attr:ID",
    "urn:oasis:names:tc:SAML:2.0:protocol:Response",
    "--id-attr:ID",
    "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
];

/// Signs the response's signatures again (the assertion's, then the response's, where they
/// are) with `key`/`cert`: what the IdP would send had it signed this content.
pub fn resign(xml: &str, key: &Path, cert: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut current = xml.to_string();
    for xpath in [
        "/*[local-name()='Response']/*[local-name()='Assertion']/*[local-name()='Signature']",
        "/*[local-name()='Response']/*[local-name()='Signature']",
    ] {
        let input = dir.path().join("in.xml");
        let output = dir.path().join("out.xml");
        std::fs::write(&input, &current).unwrap();
        let keys = format!("{},{}", key.display(), cert.display());
        let out = Command::new("xmlsec1")
            .args(["--sign", "--privkey-pem", &keys])
            .args(ID_ATTRS)
            .args(["--node-xpath", xpath, "--output"])
            .arg(&output)
            .arg(&input)
            .output()
            .expect("xmlsec1 runs");
        if out.status.success() {
            current = std::fs::read_to_string(&output).unwrap();
        }
    }
    current
}

/// A key and self-signed certificate that are not the IdP's.
pub fn other_key(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join("other.key"), dir.join("other.crt"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=Not the IdP", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    (key, cert)
}

/// An Ed25519 private key (PKCS#8 PEM) for the cluster's tokens.
pub fn token_key(path: &Path) {
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(path));
}
