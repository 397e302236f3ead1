//! SAML 2.0 sign-in (`[identity.saml]`): Vigil as a service provider of one identity provider.
//!
//! Parsing and XML signatures are samael's, on the system's xmlsec1 (never canonicalised or
//! verified here by hand). samael verifies every signature against the IdP's metadata keys
//! only and keeps nothing of the document but what a verified signature covers (so a wrapped,
//! unsigned copy of an assertion is gone before anything is read), then checks the issuer,
//! the time conditions, the audience, the destination, the bearer subject confirmation (its
//! recipient and `InResponseTo`). Before it sees a byte, this module refuses what no IdP needs
//! to send: more than `max_response_bytes`, a DTD or entity declaration, a comment (comments
//! are outside what a signature covers: `admin@example.com<!---->.evil` must never read as
//! `admin@example.com`), a processing instruction. After it, this module insists on what samael
//! leaves optional: an audience restriction naming this SP, a `NotOnOrAfter`, the subject.
//! Replays are the caller's: the assertion id is marked once in the coordinator.

use crate::config::IdentityConfig;
use crate::console::ConsoleConfig;
use crate::core::config_error::{invalid, ConfigError};
use crate::core::echo::client_text;
use anyhow::Context as _;
use samael::crypto::AllowedSignatureAlgorithm;
use samael::metadata::EntityDescriptor;
use samael::schema::Assertion;
use samael::service_provider::{ServiceProvider, ServiceProviderBuilder};
use serde::Deserialize;
use vigil_proto::record::{Principal, SamlOrigin};

/// The SAML 2.0 binding the IdP is sent the AuthnRequest with.
const REDIRECT_BINDING: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect";

/// The `[identity.saml]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlConfig {
    /// The IdP's metadata: a file, or an `https://` URL read at start.
    pub idp_metadata: String,
    /// This service provider's entity id; default `<console.public_url>/saml/metadata`.
    #[serde(default)]
    pub entity_id: Option<String>,
    /// Where the principal's subject comes from: `nameid`, or the name of an attribute.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The attribute whose values are the principal's groups.
    #[serde(default = "default_groups")]
    pub groups_attribute: String,
    /// The attribute naming the model, for agents whose IdP carries one.
    #[serde(default)]
    pub model_attribute: Option<String>,
    /// Clock skew tolerated on the assertion's times.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// The largest response accepted (decoded XML).
    #[serde(default = "default_max_bytes")]
    pub max_response_bytes: usize,
    /// The audience of the tokens issued to SAML identities; default `console.client_id`.
    #[serde(default)]
    pub token_audience: Option<String>,
    /// The audience of the tokens the token endpoint issues to workloads (RFC 7522): an
    /// agent's audience, never an operator's. Unset, the token endpoint issues nothing.
    #[serde(default)]
    pub workload_audience: Option<String>,
    /// The NameID format asked of the IdP (the AuthnRequest's `NameIDPolicy`, the SP
    /// metadata's `NameIDFormat`). Never transient: a transient NameID names a session, not
    /// a person.
    #[serde(default = "default_name_id_format")]
    pub name_id_format: String,
    /// The attribute that names the person across identity providers (as
    /// `identity.claims.person` does for the OIDC provider): the principal's `person`.
    #[serde(default)]
    pub person_attribute: Option<String>,
}

/// A NameID that lives as long as the IdP's session: never a principal's subject.
pub const TRANSIENT: &str = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient";

fn default_name_id_format() -> String {
    "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent".into()
}

fn default_subject() -> String {
    "nameid".into()
}
fn default_groups() -> String {
    "groups".into()
}
fn default_leeway() -> u64 {
    60
}
fn default_max_bytes() -> usize {
    256 * 1024
}

impl SamlConfig {
    /// The audience of the tokens the cluster issues for SAML identities: `token_audience`,
    /// or the console's client id (an audience people's tokens carry, never the one agents'
    /// tokens are for, so the embedded coordinator takes these tokens from people only).
    pub fn token_audience<'a>(&'a self, console: &'a ConsoleConfig) -> &'a str {
        self.token_audience.as_deref().unwrap_or(&console.client_id)
    }

    pub fn validate(
        &self,
        identity: &IdentityConfig,
        console: Option<&ConsoleConfig>,
    ) -> Result<(), ConfigError> {
        if identity.tokens.is_none() {
            return Err(invalid(
                "identity.saml",
                "SAML identities get tokens the cluster issues: configure [identity.tokens]",
            ));
        }
        if console.is_none_or(|c| c.public_url.is_none()) {
            return Err(invalid(
                "identity.saml",
                "the SAML endpoints are the console's: configure [console] with public_url \
                 (the IdP posts to <public_url>/auth/saml/acs)",
            ));
        }
        if self.idp_metadata.is_empty() {
            return Err(invalid("identity.saml.idp_metadata", "must not be empty"));
        }
        if self.leeway_secs > 300 {
            return Err(invalid("identity.saml.leeway_secs", "at most 300"));
        }
        // Base64 and form encoding inflate a response; 1 MiB stays under the HTTP body limit.
        if !(4096..=1024 * 1024).contains(&self.max_response_bytes) {
            return Err(invalid(
                "identity.saml.max_response_bytes",
                "between 4096 and 1048576",
            ));
        }
        if let Some(aud) = &self.token_audience {
            if !identity.audiences.contains(aud) {
                return Err(invalid(
                    "identity.saml.token_audience",
                    "must be one of identity.audiences (the nodes verify the tokens)",
                ));
            }
        }
        if let Some(aud) = &self.workload_audience {
            if !identity.audiences.contains(aud) {
                return Err(invalid(
                    "identity.saml.workload_audience",
                    "must be one of identity.audiences (the nodes verify the tokens)",
                ));
            }
            let people = console.map(|c| (c.client_id.as_str(), self.token_audience(c)));
            if people.is_some_and(|(console, saml)| aud == console || aud == saml) {
                return Err(invalid(
                    "identity.saml.workload_audience",
                    "must differ from console.client_id and identity.saml.token_audience: a \
                     workload's token is not a person's",
                ));
            }
        }
        if self.name_id_format.is_empty() || self.name_id_format == TRANSIENT {
            return Err(invalid(
                "identity.saml.name_id_format",
                "must name a format that names a person, not a session (not transient): \
                 persistent, emailAddress, unspecified …",
            ));
        }
        match (&identity.claims.person, &self.person_attribute) {
            (Some(_), None) => Err(invalid(
                "identity.saml.person_attribute",
                "identity.claims.person names the person across identity providers: name the \
                 attribute that does so for SAML identities too",
            )),
            (None, Some(_)) => Err(invalid(
                "identity.claims.person",
                "identity.saml.person_attribute names the person across identity providers: \
                 name the claim that does so for the OIDC provider's tokens too",
            )),
            _ => Ok(()),
        }
    }
}

/// Why a SAML response was refused: what the person is told and what is recorded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refused(why: impl Into<String>) -> Refused {
    Refused(why.into())
}

/// A verified sign-in.
pub struct SignIn {
    /// Subject, groups and model from the assertion; `issuer` and the token fields are the
    /// issued token's, set when it is issued.
    pub principal: Principal,
    /// When the assertion stops being valid (seconds since the epoch): how long its id is
    /// remembered against replays.
    pub not_on_or_after: u64,
    /// When the IdP's session ends (`SessionNotOnOrAfter`), if it says.
    pub session_ends: Option<u64>,
}

/// Vigil as the service provider of one IdP.
pub struct Sp {
    sp: ServiceProvider,
    /// The same IdP, for assertions exchanged at the token endpoint (RFC 7522).
    bearer: ServiceProvider,
    /// `<public_url>/auth/saml/token`: the bearer assertions' audience and recipient.
    pub token_url: String,
    config: SamlConfig,
    entity_id: String,
    idp_entity_id: String,
    sso_url: String,
    pub acs_url: String,
}

impl Sp {
    /// Reads the IdP's metadata (a file or a URL) and builds the service provider. An IdP
    /// without a signing key in its metadata is refused: nothing it sends could be verified.
    pub async fn load(
        config: &SamlConfig,
        identity: &IdentityConfig,
        public_url: &str,
    ) -> anyhow::Result<Self> {
        let xml = if config.idp_metadata.starts_with("https://")
            || config.idp_metadata.starts_with("http://")
        {
            reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(identity.http_timeout_secs))
                .redirect(reqwest::redirect::Policy::none())
                .build()?
                .get(&config.idp_metadata)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .context("identity.saml.idp_metadata")?
                .text()
                .await
                .context("identity.saml.idp_metadata")?
        } else {
            std::fs::read_to_string(&config.idp_metadata)
                .with_context(|| format!("identity.saml.idp_metadata {}", config.idp_metadata))?
        };
        Self::from_metadata(config, public_url, &xml)
    }

    /// The service provider of the IdP whose metadata is `xml`.
    /// The largest form the assertion consumer service and the token endpoint read: a
    /// response (or an assertion) of
    /// `max_response_bytes`, base64 (4/3) and then form encoded (each character at most 3),
    /// and the rest of the form. A larger response is refused here, on record, not by the
    /// HTTP server.
    pub fn max_form_bytes(&self) -> usize {
        self.config.max_response_bytes / 3 * 4 * 3 + 16 * 1024
    }

    pub fn from_metadata(config: &SamlConfig, public_url: &str, xml: &str) -> anyhow::Result<Self> {
        refuse_dtd(&xml.to_ascii_lowercase())
            .map_err(|e| anyhow::anyhow!("the IdP's metadata: {e}"))?;
        let metadata: EntityDescriptor = xml
            .parse()
            .map_err(|e| anyhow::anyhow!("the IdP's metadata does not parse: {e}"))?;
        let idp_entity_id = metadata
            .entity_id
            .clone()
            .context("the IdP's metadata names no entityID")?;
        let sso_url = metadata
            .idp_sso_descriptors
            .iter()
            .flatten()
            .flat_map(|d| &d.single_sign_on_services)
            .find(|s| s.binding == REDIRECT_BINDING)
            .map(|s| s.location.clone())
            .context("the IdP's metadata has no HTTP-Redirect SingleSignOnService")?;
        let entity_id = config
            .entity_id
            .clone()
            .unwrap_or_else(|| format!("{public_url}/saml/metadata"));
        let acs_url = format!("{public_url}/auth/saml/acs");
        let token_url = format!("{public_url}/auth/saml/token");
        let provider = |entity_id: &str, acs_url: &str, unsolicited: bool| {
            let skew = chrono::Duration::seconds(config.leeway_secs as i64);
            ServiceProviderBuilder::default()
                .entity_id(entity_id.to_string())
                .metadata_url(Some(format!("{public_url}/saml/metadata")))
                .acs_url(Some(acs_url.to_string()))
                .slo_url(None::<String>)
                // The AuthnRequest's NameIDPolicy (samael sends none without it, and makes an
                // empty format transient: validation refuses both).
                .authn_name_id_format(Some(config.name_id_format.clone()))
                .idp_metadata(metadata.clone())
                .allow_idp_initiated(unsolicited)
                .max_clock_skew(skew)
                .max_issue_delay(chrono::Duration::seconds(300) + skew)
                .allowed_signature_algorithms(Some(vec![
                    AllowedSignatureAlgorithm::RsaSha256,
                    AllowedSignatureAlgorithm::RsaSha384,
                    AllowedSignatureAlgorithm::RsaSha512,
                    AllowedSignatureAlgorithm::EcdsaSha256,
                    AllowedSignatureAlgorithm::EcdsaSha384,
                    AllowedSignatureAlgorithm::EcdsaSha512,
                ]))
                .build()
                .context("the SAML service provider")
        };
        let sp = provider(&entity_id, &acs_url, false)?;
        // RFC 7522: the assertion is for the token endpoint (its Audience and Recipient), and
        // answers no request of this cluster's.
        let bearer = provider(&token_url, &token_url, true)?;
        let keys = sp
            .idp_signing_certs()
            .map_err(|e| anyhow::anyhow!("the IdP's signing certificates: {e}"))?;
        anyhow::ensure!(
            keys.is_some_and(|k| !k.is_empty()),
            "the IdP's metadata has no signing certificate: nothing it sends could be verified"
        );
        Ok(Self {
            sp,
            bearer,
            token_url,
            config: config.clone(),
            entity_id,
            idp_entity_id,
            sso_url,
            acs_url,
        })
    }

    pub fn idp(&self) -> &str {
        &self.idp_entity_id
    }

    pub fn config(&self) -> &SamlConfig {
        &self.config
    }

    /// This SP's metadata, to register at the IdP: its entity id, the NameID format it
    /// wants, and its one assertion consumer service (HTTP-POST); signed assertions wanted,
    /// requests unsigned; no logout service (a console logout ends the console's login, not
    /// the IdP's session).
    pub fn metadata_xml(&self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <md:EntityDescriptor xmlns:md=\"urn:oasis:names:tc:SAML:2.0:metadata\" entityID=\"{}\">\n\
             <md:SPSSODescriptor AuthnRequestsSigned=\"false\" WantAssertionsSigned=\"true\" \
             protocolSupportEnumeration=\"urn:oasis:names:tc:SAML:2.0:protocol\">\n\
             <md:NameIDFormat>{}</md:NameIDFormat>\n\
             <md:AssertionConsumerService Binding=\"urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST\" \
             Location=\"{}\" index=\"0\" isDefault=\"true\"/>\n\
             </md:SPSSODescriptor>\n\
             </md:EntityDescriptor>\n",
            xml_attr(&self.entity_id),
            xml_attr(&self.config.name_id_format),
            xml_attr(&self.acs_url)
        )
    }

    /// A new AuthnRequest: its id (128 random bits) and the URL that sends it to the IdP
    /// (HTTP-Redirect binding).
    pub fn authn_request(&self) -> anyhow::Result<(String, String)> {
        let mut req = self
            .sp
            .make_authentication_request(&self.sso_url)
            .map_err(|e| anyhow::anyhow!("AuthnRequest: {e}"))?;
        req.id = format!("_{}", hex::encode(rand::random::<[u8; 16]>()));
        let url = req
            .redirect("")
            .map_err(|e| anyhow::anyhow!("AuthnRequest: {e}"))?
            .context("the AuthnRequest has no destination")?;
        Ok((req.id, url.to_string()))
    }

    /// Verifies a `SAMLResponse` (base64, as the HTTP-POST binding carries it) answering the
    /// request `request_id`.
    pub fn verify(&self, encoded: &str, request_id: &str) -> Result<SignIn, Refused> {
        let xml = self.decoded(encoded, &base64::engine::general_purpose::STANDARD)?;
        refuse_wrapping(&xml, Root::Response)?;
        refuse_unsafe_signatures(&xml)?;
        let assertion = self
            .sp
            .parse_xml_response(&xml, Some(&[request_id]))
            .map_err(|e| refused(format!("the response was refused: {e}")))?;
        self.sign_in(&assertion, &self.entity_id)
    }

    /// Verifies a bearer assertion (base64url, RFC 7522) presented at the token endpoint: signed
    /// by the IdP, for the token endpoint (Audience and bearer Recipient), in its time window.
    pub fn verify_bearer(&self, encoded: &str) -> Result<SignIn, Refused> {
        let url_safe = base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let xml = self.decoded(encoded, &url_safe)?;
        refuse_wrapping(&xml, Root::Assertion)?;
        refuse_unsafe_signatures(&xml)?;
        let assertion = self
            .bearer
            .parse_xml_response(&xml, None)
            .map_err(|e| refused(format!("the assertion was refused: {e}")))?;
        self.sign_in(&assertion, &self.token_url)
    }

    /// The XML of a base64 message, within the size limit, without what no SAML message needs.
    fn decoded(&self, encoded: &str, engine: &impl base64::Engine) -> Result<String, Refused> {
        let compact: String = encoded.split_ascii_whitespace().collect();
        let too_large = || {
            refused(format!(
                "the message is larger than {} bytes",
                self.config.max_response_bytes
            ))
        };
        if compact.len() > self.config.max_response_bytes / 3 * 4 + 4 {
            return Err(too_large());
        }
        let bytes = engine
            .decode(compact)
            .map_err(|_| refused("the message is not base64"))?;
        if bytes.len() > self.config.max_response_bytes {
            return Err(too_large());
        }
        let xml = String::from_utf8(bytes).map_err(|_| refused("the message is not UTF-8"))?;
        refuse_declarations(&xml)?;
        Ok(xml)
    }

    /// What samael leaves optional and Vigil requires, and the principal.
    fn sign_in(&self, a: &Assertion, audience: &str) -> Result<SignIn, Refused> {
        let conditions = a
            .conditions
            .as_ref()
            .ok_or_else(|| refused("the assertion has no Conditions"))?;
        // Each AudienceRestriction must admit this service provider (SAML core §2.5.1.4: an
        // assertion restricted to two audiences in two elements is for neither alone).
        let restrictions = conditions.audience_restrictions.iter().flatten();
        let ours = restrictions.clone().next().is_some()
            && restrictions
                .clone()
                .all(|r| r.audience.iter().any(|a| a == audience));
        if !ours {
            return Err(refused(format!(
                "the assertion is not for this service provider (no Audience {audience})"
            )));
        }
        let not_on_or_after = conditions
            .not_on_or_after
            .ok_or_else(|| refused("the assertion's Conditions have no NotOnOrAfter"))?
            .timestamp()
            .max(0) as u64;
        if a.id.is_empty() {
            return Err(refused("the assertion has no ID"));
        }
        let attribute = |name: &str| -> Vec<String> {
            a.attribute_statements
                .iter()
                .flatten()
                .flat_map(|s| &s.attributes)
                .filter(|at| at.name.as_deref() == Some(name))
                .flat_map(|at| &at.values)
                .filter_map(|v| v.value.clone())
                .collect()
        };
        let subject = if self.config.subject == "nameid" {
            let name_id = a.subject.as_ref().and_then(|s| s.name_id.as_ref());
            if name_id.is_some_and(|n| n.format.as_deref() == Some(TRANSIENT)) {
                return Err(refused(format!(
                    "the assertion's NameID is transient ({TRANSIENT}): it names a session \
                     at the IdP, not a person, and cannot be a subject (ask the IdP for \
                     identity.saml.name_id_format, or take the subject from an attribute)"
                )));
            }
            name_id.map(|n| n.value.trim().to_string())
        } else {
            attribute(&self.config.subject).into_iter().next()
        }
        .filter(|s| !s.is_empty())
        .ok_or_else(|| refused(format!("the assertion has no {}", self.config.subject)))?;
        let person = self
            .config
            .person_attribute
            .as_deref()
            .and_then(|name| attribute(name).into_iter().next())
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty());
        let session_ends = a
            .authn_statements
            .iter()
            .flatten()
            .filter_map(|s| s.session_not_on_or_after)
            .map(|t| t.timestamp().max(0) as u64)
            .min();
        let principal = Principal {
            subject,
            groups: attribute(&self.config.groups_attribute),
            model: self
                .config
                .model_attribute
                .as_deref()
                .and_then(|m| attribute(m).into_iter().next()),
            saml: Some(SamlOrigin {
                idp: self.idp_entity_id.clone(),
                assertion_id: a.id.clone(),
            }),
            person,
            ..Principal::default()
        };
        Ok(SignIn {
            principal,
            not_on_or_after,
            session_ends,
        })
    }
}

/// `s` as an XML (or HTML) attribute value or text, in double-quoted attributes.
pub(crate) fn xml_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Refuses what no SAML message needs and what parsers have been fooled by: a DTD or entity
/// declaration (entity expansion, external entities), a comment (text the signature does not
/// cover), a processing instruction (other than the XML declaration). These filters read the
/// message as the UTF-8 it was decoded as, and libxml2 reads it the way its XML declaration
/// (or, without one, its first bytes) says: so a declared encoding other than UTF-8
/// (`encoding="UTF-7"` makes `+ADw-!DOCTYPE` a DTD) and a NUL byte (`<\0?\0` is how libxml2
/// recognises UTF-16 without a byte order mark; XML never allows U+0000) are refused too.
pub fn refuse_declarations(xml: &str) -> Result<(), Refused> {
    if xml.contains('\0') {
        return Err(refused(
            "a NUL character is refused (XML does not allow it; it would make the message \
             read as UTF-16)",
        ));
    }
    let lower = xml.to_ascii_lowercase();
    refuse_dtd(&lower)?;
    if lower.contains("<!--") {
        return Err(refused("a comment is refused (no signature covers it)"));
    }
    let start = lower.trim_start_matches('\u{feff}').trim_start();
    let body = match start.strip_prefix("<?xml") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_whitespace()) => {
            let (declaration, body) = rest.split_once("?>").unwrap_or((rest, ""));
            refuse_encoding(declaration)?;
            body
        }
        _ => start,
    };
    if body.contains("<?") {
        return Err(refused("a processing instruction is refused"));
    }
    Ok(())
}

/// Refuses an XML declaration (its pseudo-attributes, lowercased) that names an encoding other
/// than UTF-8, or whose encoding cannot be read.
fn refuse_encoding(declaration: &str) -> Result<(), Refused> {
    let Some((_, after)) = declaration.split_once("encoding") else {
        return Ok(());
    };
    let value = after
        .trim_start()
        .strip_prefix('=')
        .map(str::trim_start)
        .and_then(|v| {
            let quote = v.chars().next().filter(|q| *q == '"' || *q == '\'')?;
            v[1..].split_once(quote).map(|(value, _)| value)
        });
    match value {
        Some("utf-8") => Ok(()),
        Some(other) => Err(refused(format!(
            "the XML declaration names encoding {}: only UTF-8 is accepted",
            client_text(other)
        ))),
        None => Err(refused(
            "the XML declaration's encoding cannot be read: only encoding=\"UTF-8\" is accepted",
        )),
    }
}

/// The element a message must be: a `Response` (Web SSO) or a bare `Assertion` (RFC 7522).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Root {
    Response,
    Assertion,
}

/// Refuses any shape but the `root` holding (or being) one `Assertion`: every signature
/// wrapping attack (XSW1–XSW8) adds a second copy of the signed element somewhere, so none
/// gets as far as choosing which copy to read.
pub fn refuse_wrapping(xml: &str, root: Root) -> Result<(), Refused> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut responses, mut assertions, mut depth) = (0, 0, 0usize);
    let mut root_found = None;
    loop {
        let (start, empty) = match reader.read_event() {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(_)) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Ok(Event::Eof) => break,
            Ok(_) => continue,
            Err(e) => {
                return Err(refused(format!(
                    "the response is not well-formed XML: {}",
                    client_text(&e.to_string())
                )))
            }
        };
        let name = start.local_name();
        if depth == 0 {
            root_found = match name.as_ref() {
                b"Response" => Some(Root::Response),
                b"Assertion" => Some(Root::Assertion),
                _ => None,
            };
        }
        match name.as_ref() {
            b"Response" => responses += 1,
            b"Assertion" => assertions += 1,
            b"EncryptedAssertion" => {
                return Err(refused("encrypted assertions are not accepted"));
            }
            _ => {}
        }
        if !empty {
            depth += 1;
        }
    }
    if depth != 0 {
        return Err(refused(
            "the response is not well-formed XML: unclosed elements",
        ));
    }
    let want_responses = usize::from(root == Root::Response);
    if root_found != Some(root) || responses != want_responses || assertions != 1 {
        return Err(refused(format!(
            "the message must be one {root:?} holding one Assertion (found {responses} \
             Response and {assertions} Assertion elements): a wrapped signature is refused"
        )));
    }
    Ok(())
}

const DSIG: &[u8] = b"http://www.w3.org/2000/09/xmldsig#";
const PROTOCOL: &[u8] = b"urn:oasis:names:tc:SAML:2.0:protocol";
const ASSERTION: &[u8] = b"urn:oasis:names:tc:SAML:2.0:assertion";
/// Exclusive canonicalisation without comments: the only canonicalisation and, with
/// [`ENVELOPED`], the only transform accepted.
const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";

/// Refuses every signature but the one shape an IdP uses, before xmlsec1 sees it: xmlsec1
/// dereferences a `Reference` and runs its transforms while it computes the digests, before
/// the signature value is checked, so what a reference or a transform could make it do is
/// open to anyone who can post a message. A signature must be a child of the `Response` or
/// `Assertion` it signs (at most one each), with one `Reference` whose `URI` is `#` and that
/// element's `ID`, canonicalised with exclusive C14N (without comments), and transformed
/// with nothing but the enveloped-signature transform and exclusive C14N (whose only child may
/// be its `InclusiveNamespaces`). `Object`, `Manifest` and `RetrievalMethod` are refused
/// wherever they are: none of them has a place in a SAML signature, and each makes xmlsec1
/// read or reference more. Nothing is fetched (a `file:`, `http:` or any other URI is never a
/// same-document `#ID`), and no XPath or XSLT runs.
pub fn refuse_unsafe_signatures(xml: &str) -> Result<(), Refused> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    /// An element on the path from the root: its namespace and local name, its `ID`, whether
    /// a signature of it was read.
    struct Open {
        ns: Vec<u8>,
        name: Vec<u8>,
        id: Option<String>,
        signed: bool,
    }
    /// The signature being read: the `#ID` its reference must name, what it holds so far.
    struct Signature {
        depth: usize,
        want: String,
        references: usize,
    }
    let attr =
        |e: &quick_xml::events::BytesStart<'_>, name: &str| -> Result<Option<String>, Refused> {
            match e.try_get_attribute(name) {
                Ok(Some(a)) => a
                    .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .map(|v| Some(v.into_owned()))
                    .map_err(|_| refused(format!("a {name} attribute cannot be read"))),
                Ok(None) => Ok(None),
                Err(_) => Err(refused(format!("a {name} attribute cannot be read"))),
            }
        };
    let mut reader = quick_xml::NsReader::from_str(xml);
    let mut path: Vec<Open> = Vec::new();
    let mut signature: Option<Signature> = None;
    loop {
        let (ns, start, empty) = match reader.read_resolved_event() {
            Ok((ns, Event::Start(e))) => (ns, e, false),
            Ok((ns, Event::Empty(e))) => (ns, e, true),
            Ok((_, Event::End(_))) => {
                path.pop();
                if signature.as_ref().is_some_and(|s| s.depth == path.len()) {
                    let s = signature.take().expect("checked");
                    if s.references != 1 {
                        return Err(refused(format!(
                            "a signature must have exactly one Reference (this one has {})",
                            s.references
                        )));
                    }
                }
                continue;
            }
            Ok((_, Event::Eof)) => break,
            Ok(_) => continue,
            // refuse_wrapping has read the same text: not reached for a well-formed message.
            Err(_) => return Err(refused("the message is not well-formed XML")),
        };
        let ns = match ns {
            ResolveResult::Bound(n) => n.as_ref().to_vec(),
            _ => Vec::new(),
        };
        let name = start.local_name().as_ref().to_vec();
        let dsig = ns == DSIG;
        let local = String::from_utf8_lossy(&name).into_owned();
        if dsig && matches!(local.as_str(), "Object" | "Manifest" | "RetrievalMethod") {
            return Err(refused(format!(
                "a signature's {local} is refused (no SAML signature needs one)"
            )));
        }
        if dsig && local == "Signature" {
            let signed = path.last_mut().filter(|p| {
                (p.ns == PROTOCOL && p.name == b"Response")
                    || (p.ns == ASSERTION && p.name == b"Assertion")
            });
            let Some(signed) = signed else {
                return Err(refused(
                    "a signature must be a child of the Response or Assertion it signs",
                ));
            };
            if std::mem::replace(&mut signed.signed, true) {
                return Err(refused("an element may carry one signature only"));
            }
            let id = signed
                .id
                .clone()
                .filter(|id| !id.is_empty())
                .ok_or_else(|| refused("a signed element has no ID"))?;
            signature = Some(Signature {
                depth: path.len(),
                want: format!("#{id}"),
                references: 0,
            });
        } else if let Some(sig) = signature.as_mut() {
            let within = path.last().map(|p| (p.ns == DSIG, p.name.as_slice()));
            match (dsig, local.as_str()) {
                (true, "Reference") => {
                    sig.references += 1;
                    let uri = attr(&start, "URI")?;
                    if uri.as_deref() != Some(sig.want.as_str()) {
                        return Err(refused(format!(
                            "a signature's Reference must be URI=\"{}\" (the element it signs), \
                             not {}",
                            sig.want,
                            uri.as_deref().map_or("none".into(), client_text)
                        )));
                    }
                }
                (true, "CanonicalizationMethod")
                    if attr(&start, "Algorithm")?.as_deref() != Some(EXC_C14N) =>
                {
                    return Err(refused(format!(
                        "a signature's canonicalisation must be {EXC_C14N}"
                    )));
                }
                (true, "Transform") => {
                    let algorithm = attr(&start, "Algorithm")?;
                    if !matches!(algorithm.as_deref(), Some(ENVELOPED | EXC_C14N)) {
                        return Err(refused(format!(
                            "a signature's transform must be {ENVELOPED} or {EXC_C14N}, not {}",
                            algorithm.as_deref().map_or("none".into(), client_text)
                        )));
                    }
                }
                _ if within == Some((true, b"Transform".as_slice()))
                    && !(ns == EXC_C14N.as_bytes() && local == "InclusiveNamespaces") =>
                {
                    return Err(refused(format!(
                        "a signature's transform may hold nothing but InclusiveNamespaces, \
                         not {}",
                        client_text(&local)
                    )));
                }
                _ => {}
            }
        }
        if !empty {
            path.push(Open {
                ns,
                id: attr(&start, "ID")?,
                name,
                signed: false,
            });
        } else if signature.as_ref().is_some_and(|s| s.depth == path.len()) {
            // `<ds:Signature/>`: a signature without a reference.
            return Err(refused(
                "a signature must have exactly one Reference (this one has 0)",
            ));
        }
    }
    Ok(())
}

/// Refuses a DTD or entity declaration (in lowercased XML).
fn refuse_dtd(lower: &str) -> Result<(), Refused> {
    if lower.contains("<!doctype") || lower.contains("<!entity") {
        return Err(refused("a DTD or an entity declaration is refused"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_comments_and_instructions_are_refused_before_parsing() {
        let ok = r#"<?xml version="1.0" encoding="UTF-8"?><samlp:Response/>"#;
        refuse_declarations(ok).unwrap();
        refuse_declarations("<samlp:Response/>").unwrap();
        for bad in [
            r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>"#,
            "<!doctype r><r/>",
            "<r><!ENTITY a 'b'></r>",
            "<r><NameID>admin@example.com<!---->.evil</NameID></r>",
            r#"<?xml version="1.0"?><r><?php echo 1 ?></r>"#,
            "<r/><?xml-stylesheet href='x'?>",
            "<?xml-stylesheet href='x'?><r/>",
        ] {
            assert!(refuse_declarations(bad).is_err(), "{bad}");
        }
    }

    /// An enveloped signature of element `id`, as IdPs make them, with `reference` as its
    /// Reference's URI and `transforms` inside its Transforms.
    fn signature(reference: &str, transforms: &str) -> String {
        format!(
            r##"<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo><ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/><ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/><ds:Reference URI="{reference}"><ds:Transforms>{transforms}</ds:Transforms><ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/><ds:DigestValue>ZGln</ds:DigestValue></ds:Reference></ds:SignedInfo><ds:SignatureValue>c2ln</ds:SignatureValue><ds:KeyInfo><ds:X509Data><ds:X509Certificate>Y2VydA==</ds:X509Certificate></ds:X509Data></ds:KeyInfo></ds:Signature>"##
        )
    }

    const USUAL: &str = r#"<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/><ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"><ec:InclusiveNamespaces xmlns:ec="http://www.w3.org/2001/10/xml-exc-c14n#" PrefixList="xs"/></ds:Transform>"#;

    fn response(response_sig: &str, assertion_sig: &str) -> String {
        format!(
            r#"<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_r1"><saml:Issuer>idp</saml:Issuer>{response_sig}<saml:Assertion ID="_a1"><saml:Issuer>idp</saml:Issuer>{assertion_sig}<saml:Subject/></saml:Assertion></samlp:Response>"#
        )
    }

    #[test]
    fn only_a_same_document_reference_with_the_usual_transforms_reaches_xmlsec() {
        let both = response(&signature("#_r1", USUAL), &signature("#_a1", USUAL));
        refuse_unsafe_signatures(&both).unwrap();
        refuse_unsafe_signatures(&response("", &signature("#_a1", USUAL))).unwrap();
        let why = |xml: String| refuse_unsafe_signatures(&xml).unwrap_err().0;
        let assertion_signed = |sig: String| why(response("", &sig));
        // What xmlsec1 would fetch or read: files, URLs, the whole document, another element.
        for uri in [
            "file:///dev/zero",
            "http://127.0.0.1:9/x",
            "",
            "#_r1",
            "#xpointer(/)",
            "#xpointer(id('_a1'))",
        ] {
            let said = assertion_signed(signature(uri, USUAL));
            assert!(said.contains("must be URI=\"#_a1\""), "{uri}: {said}");
        }
        let said = assertion_signed(signature("file:///dev/zero", USUAL));
        assert!(said.ends_with("not \"file:///dev/zero\""), "{said}");
        // Transforms that run code or select other nodes.
        for (transform, expect) in [
            (
                r#"<ds:Transform Algorithm="http://www.w3.org/TR/1999/REC-xpath-19991116"><ds:XPath>count(//. | //@* | //namespace::*)</ds:XPath></ds:Transform>"#,
                "REC-xpath",
            ),
            (
                r#"<ds:Transform Algorithm="http://www.w3.org/TR/1999/REC-xslt-19991116"/>"#,
                "REC-xslt",
            ),
            (
                r#"<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#WithComments"/>"#,
                "WithComments",
            ),
            (
                r#"<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#base64"/>"#,
                "base64",
            ),
            (
                r#"<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"><ds:XPath>1</ds:XPath></ds:Transform>"#,
                "nothing but InclusiveNamespaces",
            ),
        ] {
            let said = assertion_signed(signature("#_a1", transform));
            assert!(said.contains(expect), "{transform}: {said}");
        }
        // Another canonicalisation.
        let inclusive = signature("#_a1", USUAL).replacen(
            "http://www.w3.org/2001/10/xml-exc-c14n#\"/>",
            "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments\"/>",
            1,
        );
        assert!(assertion_signed(inclusive).contains("canonicalisation must be"));
        // Two references, or none.
        let two = signature("#_a1", USUAL).replacen(
            "</ds:SignedInfo>",
            r##"<ds:Reference URI="#_a1"><ds:DigestValue>eA==</ds:DigestValue></ds:Reference></ds:SignedInfo>"##,
            1,
        );
        assert!(assertion_signed(two).contains("exactly one Reference (this one has 2)"));
        let none = r#"<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo/></ds:Signature>"#;
        assert!(assertion_signed(none.into()).contains("(this one has 0)"));
        let empty = r#"<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"/>"#;
        assert!(assertion_signed(empty.into()).contains("(this one has 0)"));
        // Object, Manifest, RetrievalMethod, wherever they are.
        for (extra, name) in [
            (r#"<ds:Object><x/></ds:Object>"#, "Object"),
            (
                r##"<ds:Object><ds:Manifest><ds:Reference URI="file:///etc/passwd"/></ds:Manifest></ds:Object>"##,
                "Object",
            ),
            (
                r#"<ds:Manifest xmlns:ds="http://www.w3.org/2000/09/xmldsig#"/>"#,
                "Manifest",
            ),
        ] {
            let sig = signature("#_a1", USUAL).replacen(
                "</ds:Signature>",
                &format!("{extra}</ds:Signature>"),
                1,
            );
            assert!(assertion_signed(sig).contains(name), "{extra}");
        }
        let retrieval = signature("#_a1", USUAL).replacen(
            "<ds:X509Data>",
            r#"<ds:RetrievalMethod URI="http://127.0.0.1:9/key"/><ds:X509Data>"#,
            1,
        );
        assert!(assertion_signed(retrieval).contains("RetrievalMethod"));
        // A signature anywhere but as the child of what it signs, or twice on one element.
        let misplaced = response("", "").replacen(
            "<saml:Subject/>",
            &format!("<saml:Subject>{}</saml:Subject>", signature("#_a1", USUAL)),
            1,
        );
        assert!(why(misplaced).contains("must be a child of the Response or Assertion"));
        let twice = response("", &format!("{0}{0}", signature("#_a1", USUAL)));
        assert!(why(twice).contains("one signature only"));
        let no_id = response("", &signature("#_a1", USUAL)).replacen(" ID=\"_a1\"", "", 1);
        assert!(why(no_id).contains("no ID"));
    }

    #[test]
    fn only_utf8_is_read_as_the_filters_read_it() {
        for ok in [
            r#"<?xml version="1.0" encoding="UTF-8"?><r/>"#,
            r#"<?xml version='1.0' encoding = 'utf-8' standalone="no"?><r/>"#,
            "\u{feff}<?xml version=\"1.0\"?><r/>",
        ] {
            refuse_declarations(ok).unwrap();
        }
        let why = |xml: &str| refuse_declarations(xml).unwrap_err().0;
        // UTF-7: `+ADw-` is `<`, so libxml2 would read a DTD the filters never saw.
        let utf7 = r#"<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE r+AD4-<r/>"#;
        assert_eq!(
            why(utf7),
            "the XML declaration names encoding \"utf-7\": only UTF-8 is accepted"
        );
        for bad in [
            r#"<?xml version="1.0" encoding="ISO-8859-1"?><r/>"#,
            r#"<?xml version="1.0" encoding="UTF-16"?><r/>"#,
            r#"<?xml version="1.0" encoding="utf8"?><r/>"#,
        ] {
            assert!(why(bad).contains("only UTF-8 is accepted"), "{bad}");
        }
        for unreadable in [
            r#"<?xml version="1.0" encoding=UTF-7?><r/>"#,
            r#"<?xml version="1.0" encoding="UTF-8?><r/>"#,
        ] {
            assert!(why(unreadable).contains("cannot be read"), "{unreadable}");
        }
        // UTF-16 without a byte order mark, as libxml2 recognises it: `<` NUL `?` NUL.
        let utf16: String = "<?xml version=\"1.0\"?><!DOCTYPE r><r/>"
            .chars()
            .flat_map(|c| [c, '\0'])
            .collect();
        assert!(why(&utf16).contains("NUL"), "{}", why(&utf16));
    }

    #[test]
    fn only_one_root_with_one_assertion_passes() {
        let p = r#"xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion""#;
        let response = format!(
            "<samlp:Response {p}><saml:Assertion ID=\"a\"><saml:Subject/></saml:Assertion></samlp:Response>"
        );
        refuse_wrapping(&response, Root::Response).unwrap();
        assert!(refuse_wrapping(&response, Root::Assertion).is_err());
        let bare = format!("<saml:Assertion {p} ID=\"a\"><saml:Subject/></saml:Assertion>");
        refuse_wrapping(&bare, Root::Assertion).unwrap();
        assert!(refuse_wrapping(&bare, Root::Response).is_err());
        for bad in [
            format!("<samlp:Response {p}/>"),
            format!("<samlp:Response {p}><saml:Assertion/><saml:Assertion/></samlp:Response>"),
            format!("<samlp:Response {p}><saml:Assertion><saml:Assertion/></saml:Assertion></samlp:Response>"),
            format!("<samlp:Response {p}><samlp:Response><saml:Assertion/></samlp:Response></samlp:Response>"),
            format!("<x {p}><samlp:Response><saml:Assertion/></samlp:Response></x>"),
            format!("<samlp:Response {p}><saml:EncryptedAssertion/></samlp:Response>"),
            format!("<samlp:Response {p}><saml:Assertion>"),
        ] {
            assert!(refuse_wrapping(&bad, Root::Response).is_err(), "{bad}");
        }
        for bad in [
            format!("<saml:Assertion {p}><saml:Assertion/></saml:Assertion>"),
            format!("<saml:Assertion {p}><samlp:Response/></saml:Assertion>"),
            format!("<x {p}><saml:Assertion/></x>"),
        ] {
            assert!(refuse_wrapping(&bad, Root::Assertion).is_err(), "{bad}");
        }
    }
}
