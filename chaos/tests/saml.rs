//! SAML identities against a real IdP (SimpleSAMLphp, started by deploy/dev/saml/idp.sh):
//! a person signs in at the IdP in a real browser and lands in the console, their login on
//! record with the IdP's entity id and the assertion id; and what an attacker or a broken IdP
//! sends is refused and on record: unsigned, tampered, signed by another key (its certificate
//! in the document), every signature-wrapping shape, a comment in the NameID, a DTD, expired,
//! not yet valid, another audience, another recipient, unsolicited, answering another request,
//! replayed on this node or on another, oversized.
//!
//! Screenshots: `<target dir>/test-artefacts/saml/<test>/`.

use std::path::Path;
use std::time::Duration;
use vigil_chaos::saml::{self, Idp};
use vigil_chaos::webdriver::{artefact_dir, Driver};
use vigil_chaos::*;
use vigil_proto::record::{Kind, Outcome, Record};

/// One test at a time: the IdP (PHP's built-in server) answers one request at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN_ISSUER: &str = "https://vigil.test/tokens";

/// A node whose console signs people in at `idp`, and the console's URL.
struct Sp {
    node: TestNode,
    console: String,
}

/// The metadata of the token endpoint as an SP of its own (RFC 7522: a workload's assertion is
/// for the token endpoint), beside the console's in one document.
fn with_token_endpoint(console_metadata: &str, public: &str) -> String {
    let body = console_metadata
        .split_once("?>")
        .map_or(console_metadata, |(_, rest)| rest);
    let token = format!("{public}/auth/saml/token");
    format!(
        r#"<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata">{body}
<md:EntityDescriptor entityID="{token}">
  <md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">
    <md:AssertionConsumerService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" Location="{token}" index="0"/>
  </md:SPSSODescriptor>
</md:EntityDescriptor>
</md:EntitiesDescriptor>"#
    )
}

/// What the IdP is told before the node runs (the node's own metadata replaces it).
fn first_sp_metadata(console: &str) -> String {
    format!(
        r#"<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="{console}/saml/metadata">
  <md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">
    <md:AssertionConsumerService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" Location="{console}/auth/saml/acs" index="0"/>
  </md:SPSSODescriptor>
</md:EntityDescriptor>"#
    )
}

/// Shared by the nodes of one test: the cookie key, the token key.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cookie-key"),
            "the cookie key the nodes of this test share\n",
        )
        .unwrap();
        saml::token_key(&dir.path().join("token-key.pem"));
        Self { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A node listening on `port` whose public URL (its ACS, its entity id) is `public`.
async fn start_sp(
    idp: &Idp,
    keys: &Keys,
    port: u16,
    public: &str,
    coordinator: Option<String>,
) -> Sp {
    let console = format!("https://127.0.0.1:{port}");
    let node = TestNode::start(NodeOptions {
        protocols: Some(sections(idp, keys, port, public)),
        coordinator,
        ..NodeOptions::default()
    })
    .await;
    Sp { node, console }
}

/// The console (listening on `port`, public at `public`), the cluster's tokens and SAML.
fn sections(idp: &Idp, keys: &Keys, port: u16, public: &str) -> String {
    format!(
        r#"[console]
listen = "127.0.0.1:{port}"
client_id = "vigil-console"
public_url = "{public}"
login = "saml"
auditor_group = "auditors"
cookie_key = {{ file = "{cookie}" }}

[identity.tokens]
issuer = "{TOKEN_ISSUER}"
signing_key = {{ file = "{token}" }}
key_id = "t1"

[identity.saml]
idp_metadata = "{metadata}"
model_attribute = "model"
workload_audience = "{agents}"
"#,
        cookie = keys.path("cookie-key").display(),
        token = keys.path("token-key.pem").display(),
        metadata = idp.metadata_url,
        agents = env().get("VIGIL_OIDC_AUDIENCE"),
    )
}

/// The IdP, and a node it knows (by the node's own metadata).
async fn setup(keys: &Keys) -> (Idp, Sp) {
    let port = free_port();
    let console = format!("https://127.0.0.1:{port}");
    let idp = Idp::start(&first_sp_metadata(&console));
    let sp = start_sp(&idp, keys, port, &console, None).await;
    idp.register(&sp_metadata(&console).await);
    (idp, sp)
}

/// The node's own SP metadata (`/saml/metadata` of the console at `console`).
/// [`setup`], with the IdP knowing the token endpoint as a recipient; and that endpoint's URL.
async fn setup_token_endpoint(keys: &Keys) -> (Idp, Sp, String) {
    let (idp, sp) = setup(keys).await;
    let console = sp.console.as_str();
    idp.register(&with_token_endpoint(&sp_metadata(console).await, console));
    let token_url = format!("{console}/auth/saml/token");
    (idp, sp, token_url)
}

async fn sp_metadata(console: &str) -> String {
    let res = http()
        .get(format!("{console}/saml/metadata"))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let metadata = res.text().await.unwrap();
    assert_eq!(status, 200, "{metadata}");
    metadata
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A sign-in started at the node: the browser's SAML cookie and where it is sent.
async fn start_sign_in(console: &str) -> (String, String) {
    let res = http()
        .get(format!("{console}/auth/saml/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "{:?}", res.text().await);
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("__Host-vigil-saml="))
        .expect("the SAML cookie");
    assert!(
        cookie.contains("SameSite=None") && cookie.contains("Secure"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let to = res.headers()["location"].to_str().unwrap().to_string();
    (cookie, to)
}

/// A whole sign-in at the IdP as `user`: the SAML cookie and the response's XML.
async fn response_for(console: &str, user: &str) -> (String, String) {
    let (cookie, to) = start_sign_in(console).await;
    let response = saml::sign_in(&to, user).await;
    (cookie, saml::decode(&response))
}

/// Posts a response to the node's ACS: the status and the body (the refusal says why).
async fn post(console: &str, cookie: Option<&str>, xml: &str) -> (u16, String) {
    let mut req = http().post(format!("{console}/auth/saml/acs")).form(&[
        ("SAMLResponse", saml::encode(xml)),
        ("RelayState", String::new()),
    ]);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let logged_in = res.headers().get_all("set-cookie").iter().any(|v| {
        v.to_str().unwrap().starts_with("__Host-vigil-session=")
            && !v.to_str().unwrap().contains("Max-Age=0")
    });
    let body = res.text().await.unwrap();
    assert_eq!(logged_in, status == 303, "{status} {body}");
    (status, body)
}

/// The node's records of console logins, as (outcome, detail, subject).
async fn logins(sp: &Sp) -> Vec<(Outcome, String, Option<String>)> {
    sp.node
        .records()
        .await
        .into_iter()
        .filter(|r| {
            r.body.kind == Kind::SessionStart
                && r.body
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.protocol == "console")
        })
        .map(|r| {
            (
                r.body.outcome.unwrap(),
                r.body.detail.unwrap_or_default(),
                r.body.principal.map(|p| p.subject.clone()),
            )
        })
        .collect()
}

/// A person signs in at the IdP in the browser and lands in the console; the login is on
/// record with the cluster's issuer, the IdP and the assertion id, and the groups the IdP
/// asserted decide what the console shows (dave: an auditor).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_a_person_signs_in_at_the_idp_and_lands_in_the_console() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let (idp, sp) = setup(&keys).await;
    let shots = artefact_dir("saml/t10");
    let driver = Driver::start().await;
    let dave = driver.browser().await;
    dave.goto(&format!("{}/", sp.console)).await;
    let user = dave
        .wait_for("input[name=username]", Duration::from_secs(20))
        .await;
    assert!(dave
        .url()
        .await
        .starts_with(&format!("http://127.0.0.1:{}/", idp.port)));
    dave.screenshot(&shots.join("01-idp-login.png")).await;
    dave.type_into(&user, "dave").await;
    let password = dave
        .wait_for("input[name=password]", Duration::from_secs(5))
        .await;
    dave.type_into(&password, "dev").await;
    dave.try_execute(
        "document.querySelector('form').submit(); return true;",
        serde_json::json!([]),
    )
    .await
    .unwrap();
    let who = dave.wait_for("#who", Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dave.text(&who).await != "dave" {
        assert!(
            std::time::Instant::now() < deadline,
            "the console does not name dave"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dave.url().await.starts_with(&sp.console));
    dave.goto(&format!("{}/#sessions", sp.console)).await;
    dave.wait_for("#sessions", Duration::from_secs(10)).await;
    dave.screenshot(&shots.join("02-console-as-dave.png")).await;
    dave.close().await;

    let record = sp
        .node
        .records()
        .await
        .into_iter()
        .find(|r| {
            r.body.kind == Kind::SessionStart
                && r.body.outcome == Some(Outcome::Success)
                && r.body
                    .principal
                    .as_ref()
                    .is_some_and(|p| p.subject == "dave")
        })
        .expect("dave's login on record");
    let p = record.body.principal.unwrap();
    assert_eq!(p.issuer, TOKEN_ISSUER);
    assert_eq!(p.groups, ["auditors"]);
    let origin = p.saml.clone().expect("the SAML origin");
    assert_eq!(origin.idp, idp.metadata_url);
    assert!(origin.assertion_id.starts_with('_'), "{origin:?}");
}

/// Replace the first `from` by `to`, which must be there.
fn swap(xml: &str, from: &str, to: &str) -> String {
    assert!(xml.contains(from), "{from} not in the response");
    xml.replacen(from, to, 1)
}

/// Every ` NAME="…"` attribute set to `value`.
fn set_attr(xml: &str, name: &str, value: &str) -> String {
    let key = format!(" {name}=\"");
    let mut out = String::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&key) {
        let start = at + key.len();
        let end = rest[start..].find('"').unwrap() + start;
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The response without its `ds:Signature` elements.
fn unsigned(xml: &str) -> String {
    let mut out = xml.to_string();
    while let Some(start) = out.find("<ds:Signature") {
        let end = out[start..].find("</ds:Signature>").unwrap() + start + "</ds:Signature>".len();
        out.replace_range(start..end, "");
    }
    out
}

/// The `(start, end)` byte range of the first element named `tag` (with its prefix).
fn element(xml: &str, tag: &str) -> (usize, usize) {
    let start = xml
        .find(&format!("<{tag} "))
        .or_else(|| xml.find(&format!("<{tag}>")))
        .unwrap();
    let close = format!("</{tag}>");
    let end = xml[start..].find(&close).unwrap() + start + close.len();
    (start, end)
}

/// The eight signature-wrapping shapes (Somorovsky et al.), each a signed original and an
/// evil copy (NameID `alice`, another ID) placed so that a parser reading "the" assertion or
/// response might read the copy while the signature check finds the original.
fn wrapped(xml: &str) -> Vec<(&'static str, String)> {
    let (a0, a1) = element(xml, "saml:Assertion");
    let assertion = &xml[a0..a1];
    let evil_assertion = unsigned(assertion)
        .replacen(" ID=\"", " ID=\"_evil", 1)
        .replacen(">dave<", ">alice<", 1);
    let (r0, _) = element(xml, "samlp:Response");
    let response = &xml[r0..];
    let evil_response = xml
        .replacen(" ID=\"", " ID=\"_evil", 1)
        .replacen(">dave<", ">alice<", 1);
    let evil_response = unsigned(&evil_response);
    let (s0, s1) = element(xml, "ds:Signature"); // the response's own signature
    let signature = &xml[s0..s1];
    let resp_open_end = xml[r0..].find('>').unwrap() + r0 + 1;
    let mut shapes = Vec::new();
    // XSW1: an evil response whose Signature holds the original response.
    let sig_with_original =
        signature.replacen("</ds:Signature>", &format!("{response}</ds:Signature>"), 1);
    let er_open_end = evil_response.find('>').unwrap() + 1;
    shapes.push((
        "XSW1",
        format!(
            "{}{}{}",
            &evil_response[..er_open_end],
            sig_with_original,
            &evil_response[er_open_end..]
        ),
    ));
    // XSW2: the same, the original response beside the signature instead of in it.
    shapes.push((
        "XSW2",
        format!(
            "{}{}{}{}",
            &evil_response[..er_open_end],
            signature,
            response,
            &evil_response[er_open_end..]
        ),
    ));
    // XSW3: an evil assertion before the original one.
    shapes.push((
        "XSW3",
        format!("{}{}{}", &xml[..a0], evil_assertion, &xml[a0..]),
    ));
    // XSW4: an evil assertion holding the original one.
    let inner = evil_assertion.replacen(
        "</saml:Assertion>",
        &format!("{assertion}</saml:Assertion>"),
        1,
    );
    shapes.push(("XSW4", format!("{}{}{}", &xml[..a0], inner, &xml[a1..])));
    // XSW5: the evil assertion carries the original's signature; the original moves after it.
    let (as0, as1) = element(assertion, "ds:Signature");
    let assertion_sig = &assertion[as0..as1];
    let evil_signed = evil_assertion.replacen(
        "</saml:Issuer>",
        &format!("</saml:Issuer>{assertion_sig}"),
        1,
    );
    shapes.push((
        "XSW5",
        format!(
            "{}{}{}{}",
            &xml[..a0],
            evil_signed,
            unsigned(assertion),
            &xml[a1..]
        ),
    ));
    // XSW6: the original assertion inside the evil assertion's signature.
    let sig_holding =
        assertion_sig.replacen("</ds:Signature>", &format!("{assertion}</ds:Signature>"), 1);
    let evil6 =
        evil_assertion.replacen("</saml:Issuer>", &format!("</saml:Issuer>{sig_holding}"), 1);
    shapes.push(("XSW6", format!("{}{}{}", &xml[..a0], evil6, &xml[a1..])));
    // XSW7: the original inside an Extensions element, the evil assertion in its place.
    let ext = format!("<samlp:Extensions>{assertion}</samlp:Extensions>");
    shapes.push((
        "XSW7",
        format!(
            "{}{}{}{}{}",
            &xml[..resp_open_end],
            ext,
            &xml[resp_open_end..a0],
            evil_assertion,
            &xml[a1..]
        ),
    ));
    // XSW8: the original inside an Object of the evil assertion's signature.
    let object = assertion_sig.replacen(
        "</ds:Signature>",
        &format!(
            "<ds:Object>{}</ds:Object></ds:Signature>",
            unsigned(assertion)
        ),
        1,
    );
    let evil8 = evil_assertion.replacen("</saml:Issuer>", &format!("</saml:Issuer>{object}"), 1);
    shapes.push(("XSW8", format!("{}{}{}", &xml[..a0], evil8, &xml[a1..])));
    shapes
}

/// Every way a response can be wrong is refused at the ACS, with the reason, and on record
/// (`session_start`, outcome `denied`); the same content signed again by the IdP's own key
/// passes, so each refusal is for what was changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_what_an_attacker_or_a_broken_idp_sends_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let (idp, sp) = setup(&keys).await;
    let console = sp.console.as_str();
    let (idp_key, idp_cert) = idp.key();
    let other = tempfile::tempdir().unwrap();
    let (other_key, other_cert) = saml::other_key(other.path());
    let resigned = |xml: &str| saml::resign(xml, &idp_key, &idp_cert);
    let by_idp = |changed: &str| -> String {
        let (k, c) = idp.key();
        saml::resign(changed, &k, &c)
    };

    // The control: a fresh response, signed again by the IdP's key unchanged, passes; the
    // same response again (on this node) is a replay.
    let (cookie, xml) = response_for(console, "dave").await;
    let (status, body) = post(console, Some(&cookie), &resigned(&xml)).await;
    assert_eq!(status, 303, "{body}");
    let (status, body) = post(console, Some(&cookie), &resigned(&xml)).await;
    assert_eq!(status, 401);
    assert!(body.contains("used before"), "{body}");

    let mut refused = 1;
    let mut expect = |name: &str, status: u16, body: &str, why: &str| {
        assert_eq!(status, 401, "{name}: {body}");
        assert!(
            body.to_lowercase().contains(&why.to_lowercase()),
            "{name}: {body}"
        );
        refused += 1;
    };
    let later = |secs: i64| {
        (time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    type Change<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let cases: Vec<(&str, Change<'_>, &str)> = vec![
        ("unsigned", Box::new(unsigned), "must be signed"),
        (
            "tampered",
            Box::new(|x: &str| swap(x, ">dave<", ">alice<")),
            "must be signed",
        ),
        (
            "another key, its certificate in the document",
            Box::new(move |x: &str| {
                saml::resign(&swap(x, ">dave<", ">alice<"), &other_key, &other_cert)
            }),
            "must be signed",
        ),
        (
            "comment in the NameID",
            Box::new(|x: &str| swap(x, ">dave<", ">dave<!---->.evil<")),
            "comment",
        ),
        (
            "a DTD",
            Box::new(|x: &str| {
                let dtd = "<!DOCTYPE r [<!ENTITY e SYSTEM \"file:///etc/passwd\">]>";
                match x.find("?>") {
                    Some(at) => format!("{}{dtd}{}", &x[..at + 2], &x[at + 2..]),
                    None => format!("{dtd}{x}"),
                }
            }),
            "DTD",
        ),
        (
            "expired",
            Box::new(move |x: &str| by_idp(&set_attr(x, "NotOnOrAfter", &later(-3600)))),
            "expired",
        ),
        (
            "another audience",
            Box::new(move |x: &str| {
                let aud = x.find("<saml:Audience>").unwrap() + "<saml:Audience>".len();
                let end = x[aud..].find('<').unwrap() + aud;
                by_idp(&format!(
                    "{}https://other.example/sp{}",
                    &x[..aud],
                    &x[end..]
                ))
            }),
            "audience",
        ),
        (
            // Every AudienceRestriction must admit the service provider (SAML core 2.5.1.4).
            "a second AudienceRestriction for another audience",
            Box::new(move |x: &str| {
                by_idp(&swap(
                    x,
                    "</saml:AudienceRestriction>",
                    "</saml:AudienceRestriction><saml:AudienceRestriction><saml:Audience>https://other.example/sp</saml:Audience></saml:AudienceRestriction>",
                ))
            }),
            "audience",
        ),
        (
            "another recipient",
            Box::new(move |x: &str| {
                by_idp(&swap(
                    x,
                    "Recipient=\"https://",
                    "Recipient=\"https://other.example/",
                ))
            }),
            "recipient",
        ),
        (
            "oversized",
            Box::new(|x: &str| {
                swap(
                    x,
                    "<saml:Issuer>",
                    &format!("{}<saml:Issuer>", " ".repeat(300 * 1024)),
                )
            }),
            "larger",
        ),
    ];
    for (name, change, why) in &cases {
        let (cookie, xml) = response_for(console, "dave").await;
        let (status, body) = post(console, Some(&cookie), &change(&xml)).await;
        expect(name, status, &body, why);
    }
    // Not yet valid: NotBefore an hour ahead, signed by the IdP.
    let (cookie, xml) = response_for(console, "dave").await;
    let changed = set_attr(&xml, "NotBefore", &later(3600));
    let (status, body) = post(console, Some(&cookie), &resigned(&changed)).await;
    expect("not yet valid", status, &body, "not valid until");

    // Wrapping: every shape refused before samael chooses a copy.
    for (shape, xml) in wrapped(&response_for(console, "dave").await.1) {
        let (cookie, _) = start_sign_in(console).await;
        let (status, body) = post(console, Some(&cookie), &xml).await;
        expect(shape, status, &body, "wrapped signature");
    }

    // Unsolicited (no sign-in started in this browser), and an answer to another request.
    let (_, xml) = response_for(console, "dave").await;
    let (status, body) = post(console, None, &xml).await;
    expect("unsolicited", status, &body, "unsolicited");
    let (other_cookie, _) = start_sign_in(console).await;
    let (status, body) = post(console, Some(&other_cookie), &xml).await;
    expect("another request's answer", status, &body, "InResponseTo");

    // Each refusal is on record, with why.
    let denied = logins(&sp)
        .await
        .into_iter()
        .filter(|(o, _, _)| *o == Outcome::Denied)
        .count();
    assert_eq!(denied, refused, "every refusal on record");
}

/// An assertion one node accepted is refused by another node of the cluster (the replay
/// cache is the coordinator's), even with the browser's own cookie: two nodes behind one
/// public URL (a balancer's), the copied response posted to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_an_assertion_is_used_once_in_the_whole_cluster() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = vigil_chaos::cluster::Cluster::start(1).await;
    let keys = Keys::new();
    let (port_a, port_b) = (free_port(), free_port());
    let public = format!("https://127.0.0.1:{port_a}");
    let idp = Idp::start(&first_sp_metadata(&public));
    let a = start_sp(&idp, &keys, port_a, &public, Some(cluster.node_section())).await;
    let b = start_sp(&idp, &keys, port_b, &public, Some(cluster.node_section())).await;
    idp.register(&sp_metadata(&public).await);

    // Used at A, then replayed at B.
    let (cookie, xml) = response_for(&a.console, "alice").await;
    let (status, body) = post(&a.console, Some(&cookie), &xml).await;
    assert_eq!(status, 303, "A: {body}");
    let (status, body) = post(&b.console, Some(&cookie), &xml).await;
    assert_eq!(status, 401, "B: {body}");
    assert!(body.contains("used before"), "{body}");
    // Started at A, used at B (any node completes a sign-in), then replayed at A.
    let (cookie, xml) = response_for(&a.console, "bob").await;
    let (status, body) = post(&b.console, Some(&cookie), &xml).await;
    assert_eq!(status, 303, "B: {body}");
    let (status, body) = post(&a.console, Some(&cookie), &xml).await;
    assert_eq!(status, 401, "A: {body}");
    assert!(body.contains("used before"), "{body}");

    let subjects = |logins: Vec<(Outcome, String, Option<String>)>| {
        logins
            .into_iter()
            .map(|(o, _, s)| (o, s.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        subjects(logins(&a).await),
        [
            (Outcome::Success, "alice".into()),
            (Outcome::Denied, String::new())
        ]
    );
    assert_eq!(
        subjects(logins(&b).await),
        [
            (Outcome::Denied, String::new()),
            (Outcome::Success, "bob".into())
        ]
    );
}

/// A workload holding a SAML bearer assertion (signed by the IdP for the token endpoint)
/// exchanges it for a token the cluster issues (RFC 7522), and connects to PostgreSQL with it:
/// the session's records name the SAML subject, the IdP and the assertion id. The assertion
/// does not work twice, nor does one meant for the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_a_workload_exchanges_a_bearer_assertion_and_uses_postgres() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let (idp, sp, token_url) = setup_token_endpoint(&keys).await;
    let console = sp.console.as_str();
    let (assertion, assertion_id) = saml_assertion(&idp, &token_url, "agent-saml").await;
    let res = exchange(&token_url, &assertion).await;
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["token_type"], "Bearer");
    let token = answer["access_token"].as_str().unwrap().to_string();

    let (client, task) = sp
        .node
        .client(&token)
        .await
        .expect("psql with the issued token");
    let log_start = pg_log_len();
    let row = client.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    let _ = task.await;
    let records = sp.node.records().await;
    let statement = records
        .iter()
        .find(|r| {
            matches!(&r.body.request, Some(vigil_proto::record::Request::Postgres(q)) if q.text.contains("41 + 1"))
        })
        .expect("the statement on record");
    let p = statement.body.principal.as_ref().unwrap();
    assert_eq!(p.subject, "agent-saml");
    assert_eq!(p.issuer, TOKEN_ISSUER);
    assert_eq!(p.model.as_deref(), Some("gpt-5"));
    let origin = p.saml.as_ref().expect("the SAML origin");
    assert_eq!(origin.idp, idp.metadata_url);
    assert_eq!(origin.assertion_id, assertion_id);
    // PostgreSQL's own log: the statement the record names ran, once.
    let ran = pg_executed(&sp.node.files.db, log_start);
    let ran = ran.iter().filter(|r| r.text == "SELECT 41 + 1").count();
    assert_eq!(ran, 1, "PostgreSQL ran the recorded statement once");

    // Not twice, and not an assertion meant for the console.
    let res = exchange(&token_url, &assertion).await;
    assert_eq!(res.status(), 400);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["error"], "invalid_grant");
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("used before"),
        "{answer}"
    );
    let (_, web) = response_for(console, "agent-saml").await;
    let res = exchange(&token_url, &saml::assertion_of(&web)).await;
    let answer: serde_json::Value = res.json().await.unwrap();
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("Recipient")
            || answer["error_description"]
                .as_str()
                .unwrap()
                .contains("Audience"),
        "{answer}"
    );
    let res = http()
        .post(&token_url)
        .form(&[("grant_type", "password"), ("username", "x")])
        .send()
        .await
        .unwrap();
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["error"], "unsupported_grant_type");

    // A form over what the endpoint reads (a response of identity.saml.max_response_bytes,
    // 256 KiB, encoded: about 1 MiB) is refused unread.
    let res = http()
        .post(&token_url)
        .form(&[
            ("grant_type", "g".repeat(1_100_000).as_str()),
            ("assertion", "x"),
        ])
        .send()
        .await;
    assert!(res.as_ref().map_or(true, |r| r.status() == 413), "{res:?}");
    // A grant_type of 0.9 MB is quoted cut short in the refusal's record, with its length and
    // hash: the record stays far below a Kafka message's limit, which a record holding all of
    // it would pass (and hold up the stream).
    let huge = "g".repeat(900_000);
    let res = http()
        .post(&token_url)
        .form(&[("grant_type", huge.as_str()), ("assertion", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["error"], "unsupported_grant_type");
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(huge.as_bytes()));
    sp.node.node.audit.flush().await;
    let lines = log_lines(&sp.node.files.audit_dir);
    let line = lines
        .iter()
        .find(|l| String::from_utf8_lossy(l).contains(&hash))
        .expect("the refusal on record, with the grant_type's hash");
    assert!(line.len() < 2048, "{} bytes", line.len());
    let detail = Record::parse(line).unwrap().body.detail.unwrap();
    assert!(
        detail.starts_with(&format!(
            "grant_type \"{}…\" (900000 bytes, SHA-256 {hash})",
            "g".repeat(256)
        )),
        "{detail}"
    );
}

/// Exchanges the bearer assertion `assertion` (its XML) at the token endpoint `token_url`.
async fn exchange(token_url: &str, assertion: &str) -> reqwest::Response {
    use base64::Engine as _;
    http()
        .post(token_url)
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:saml2-bearer",
            ),
            (
                "assertion",
                &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(assertion),
            ),
        ])
        .send()
        .await
        .unwrap()
}

/// A bearer assertion of `user` from the IdP, for the token endpoint, standing alone, and its
/// ID.
async fn saml_assertion(idp: &Idp, token_url: &str, user: &str) -> (String, String) {
    let sso = idp.metadata_url.replace("metadata.php", "SSOService.php");
    let response = saml::sign_in(&saml::authn_request_url(&sso, token_url, token_url), user).await;
    let assertion = saml::assertion_of(&saml::decode(&response));
    let id = assertion
        .split(" ID=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    (assertion, id)
}

/// xmlsec1 dereferences a signature's references and runs its transforms before it checks the
/// signature value, so what an unauthenticated poster puts there must never reach it: a
/// reference to a URL or a file, an XSLT transform, an `Object`, a `RetrievalMethod`. Each is
/// refused at the token endpoint with the reason, on record, and a listener the references
/// point at is never contacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t45_a_signature_that_would_fetch_or_transform_is_refused_before_xmlsec() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let (idp, sp, token_url) = setup_token_endpoint(&keys).await;

    // What the references point at: a loopback listener that counts who connects.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lure = format!("http://{}", listener.local_addr().unwrap());
    let contacted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = contacted.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    let (assertion, id) = saml_assertion(&idp, &token_url, "agent-saml").await;
    let reference = format!("URI=\"#{id}\"");
    type Change<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let cases: Vec<(&str, Change<'_>, &str)> = vec![
        (
            "a reference to a URL",
            Box::new(|x: &str| swap(x, &reference, &format!("URI=\"{lure}/reference\""))),
            "Reference must be URI",
        ),
        (
            "a reference to a file",
            Box::new(|x: &str| swap(x, &reference, "URI=\"file:///dev/zero\"")),
            "Reference must be URI",
        ),
        (
            "an XSLT transform that loads a stylesheet",
            Box::new(|x: &str| {
                swap(
                    x,
                    "<ds:Transforms>",
                    &format!(
                        r#"<ds:Transforms><ds:Transform Algorithm="http://www.w3.org/TR/1999/REC-xslt-19991116"><xsl:stylesheet xmlns:xsl="http://www.w3.org/1999/XSL/Transform" version="1.0"><xsl:include href="{lure}/xslt"/></xsl:stylesheet></ds:Transform>"#
                    ),
                )
            }),
            "transform must be",
        ),
        (
            "an Object",
            Box::new(|x: &str| {
                swap(
                    x,
                    "</ds:Signature>",
                    "<ds:Object><x>more</x></ds:Object></ds:Signature>",
                )
            }),
            "Object is refused",
        ),
        (
            "a RetrievalMethod",
            Box::new(|x: &str| {
                swap(
                    x,
                    "<ds:KeyInfo>",
                    &format!(r#"<ds:KeyInfo><ds:RetrievalMethod URI="{lure}/key"/>"#),
                )
            }),
            "RetrievalMethod is refused",
        ),
    ];
    for (name, change, why) in &cases {
        let res = exchange(&token_url, &change(&assertion)).await;
        assert_eq!(res.status(), 400, "{name}");
        let answer: serde_json::Value = res.json().await.unwrap();
        assert_eq!(answer["error"], "invalid_grant", "{name}: {answer}");
        let said = answer["error_description"].as_str().unwrap();
        assert!(said.contains(why), "{name}: {said}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        contacted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was fetched"
    );
    let refusals = logins(&sp)
        .await
        .into_iter()
        .filter(|(o, d, _)| *o == Outcome::Denied && d.contains("signature"))
        .count();
    assert_eq!(refusals, cases.len(), "every refusal on record");

    // The untouched assertion is still good: each refusal was for what was changed.
    let res = exchange(&token_url, &assertion).await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
}

/// `vigil login --saml`: the person signs in at the IdP (through the console), the CLI's
/// loopback listener gets a sealed code, redeems it at the gateway with its PKCE verifier, keeps
/// the token and gets an SSH certificate; psql works with the token. The code works only with
/// the verifier. Without `workload_audience` the token endpoint issues nothing, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_vigil_login_saml_gets_the_token_and_the_ssh_certificate() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let port = free_port();
    let console = format!("https://127.0.0.1:{port}");
    let idp = Idp::start(&first_sp_metadata(&console));
    let more = sections(&idp, &keys, port, &console);
    let workload = format!(
        "workload_audience = \"{}\"\n",
        env().get("VIGIL_OIDC_AUDIENCE")
    );
    assert!(more.contains(&workload));
    let more = more.replace(&workload, "");
    let g = vigil_chaos::ssh::Gateway::start_more("", &more).await;
    idp.register(&sp_metadata(&console).await);
    let res = exchange(&format!("{console}/auth/saml/token"), "<saml:Assertion/>").await;
    assert_eq!(res.status(), 400);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["error"], "unsupported_grant_type", "{answer}");
    let why = answer["error_description"].as_str().unwrap();
    assert!(why.contains("identity.saml.workload_audience"), "{why}");
    let on_record = g.node.records().await.into_iter().any(|r| {
        r.body.kind == Kind::SessionStart
            && r.body.outcome == Some(Outcome::Denied)
            && r.body.detail.as_deref() == Some(why)
    });
    assert!(on_record, "the refusal on record");

    let home = tempfile::tempdir().unwrap();
    let (stdout, code) = login_saml(&console, g.cli_args(home.path()), "agent-saml").await;
    assert!(stdout.contains("logged in as agent-saml"), "{stdout}");
    assert!(stdout.contains("certificate"), "{stdout}");

    let (status, token) = vigil(&["token", "--home", &home.path().display().to_string()]);
    assert_eq!(status, 0, "{token}");
    let (client, task) = g
        .node
        .client(token.trim())
        .await
        .expect("psql with the token");
    let log_start = pg_log_len();
    let row = client.query_one("SELECT 6 * 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    let _ = task.await;
    let record = g
        .node
        .records()
        .await
        .into_iter()
        .find(|r| {
            matches!(&r.body.request, Some(vigil_proto::record::Request::Postgres(q)) if q.text.contains("6 * 7"))
        })
        .expect("the statement on record");
    let p = record.body.principal.unwrap();
    assert_eq!(p.subject, "agent-saml");
    assert_eq!(p.issuer, TOKEN_ISSUER);
    assert!(
        p.saml.as_ref().is_some_and(|s| s.idp == idp.metadata_url),
        "{p:?}"
    );
    let ran = pg_executed(&g.node.files.db, log_start);
    let ran = ran.iter().filter(|r| r.text == "SELECT 6 * 7").count();
    assert_eq!(ran, 1, "PostgreSQL ran the recorded statement once");

    // The code with another verifier: refused.
    let api = format!("https://{}", g.node.node.api_addr.unwrap());
    let res = http()
        .post(format!("{api}/v1/saml/code"))
        .json(&serde_json::json!({ "code": code, "code_verifier": "x".repeat(43) }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let why: serde_json::Value = res.json().await.unwrap();
    assert!(why["error"].as_str().unwrap().contains("verifier"), "{why}");
}

/// `vigil login --saml --no-browser CLI_ARGS` signing `user` in, the browser's part (the
/// console, the IdP, back to the console's ACS, on to the CLI) done here: what the CLI printed
/// and the code the console sent it.
async fn login_saml(console: &str, cli_args: Vec<String>, user: &str) -> (String, String) {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(bin("vigil"))
        .args(["login", "--saml", "--no-browser"])
        .args(cli_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("the sign-in URL");
        if let Some(u) = line.trim().strip_prefix("https://") {
            break format!("https://{u}");
        }
    };
    assert!(
        url.starts_with(&format!("{console}/auth/saml/login?cli_port=")),
        "{url}"
    );
    // The browser: the console, the IdP, back to the console's ACS, on to the CLI.
    let res = http().get(&url).send().await.unwrap();
    assert_eq!(res.status(), 303);
    let cookie = res.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let to_idp = res.headers()["location"].to_str().unwrap().to_string();
    let response = saml::sign_in(&to_idp, user).await;
    let res = http()
        .post(format!("{console}/auth/saml/acs"))
        .header("cookie", &cookie)
        .form(&[("SAMLResponse", response)])
        .send()
        .await
        .unwrap();
    // A page that says which port asks for a token as whom; nothing goes to the CLI until
    // the person follows its link (whoever sent the sign-in link chose the port).
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("location").is_none());
    let page = res.text().await.unwrap();
    let port = url
        .split("cli_port=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert!(
        page.contains(&format!(
            "listening on port {port} of this computer asks for a token as <b>{user}"
        )),
        "{page}"
    );
    let to_cli = page
        .split(r#"<a id="continue" href=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the link to the CLI")
        .replace("&amp;", "&");
    assert!(
        to_cli.starts_with(&format!("http://127.0.0.1:{port}/callback?")),
        "{to_cli}"
    );
    let code = reqwest::Url::parse(&to_cli)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert_eq!(reqwest::get(&to_cli).await.unwrap().status(), 200);
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    (stdout.into_owned(), code)
}

/// A token the cluster issued stops working, on every protocol, once it has expired or once
/// the key that signed it is retired past its `until`; one of the current key works on each
/// (PostgreSQL, the SSH certificate API, the Kubernetes API). No IdP is involved: the tokens are
/// what the cluster would have issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_an_expired_token_or_one_of_a_retired_key_is_refused_on_every_protocol() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (current, retired) = (dir.path().join("current.pem"), dir.path().join("old.pem"));
    saml::token_key(&current);
    saml::token_key(&retired);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let tokens = format!(
        r#"
[identity.tokens]
issuer = "{TOKEN_ISSUER}"
signing_key = {{ file = "{}" }}
key_id = "current"

[[identity.tokens.retired]]
key_id = "old"
signing_key = {{ file = "{}" }}
until = {}
"#,
        current.display(),
        retired.display(),
        now - 1
    );
    let sign = |key: &Path, kid: &str, exp: i64| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid.into());
        header.typ = Some("at+jwt".into());
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "agent-saml", "aud": env().get("VIGIL_OIDC_AUDIENCE"),
            "groups": ["dba"], "iat": now - 60, "nbf": now - 60, "exp": exp,
            "jti": random_suffix(),
        });
        let pem = std::fs::read(key).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let good = sign(&current, "current", now + 600);
    let refused = [
        ("expired", sign(&current, "current", now - 120)),
        ("retired key", sign(&retired, "old", now + 600)),
    ];

    // PostgreSQL and the SSH certificate API (one gateway serves both).
    let g = vigil_chaos::ssh::Gateway::start_more("", &tokens).await;
    let (client, task) = g.node.client(&good).await.expect("the current key's token");
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    let _ = task.await;
    let api = format!("https://{}", g.node.node.api_addr.unwrap());
    let certificate = |token: String| {
        http()
            .post(format!("{api}/v1/ssh/certificate"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x" }))
            .send()
    };
    assert_ne!(certificate(good.clone()).await.unwrap().status(), 401);
    for (name, token) in &refused {
        let Err(err) = g.node.client(token).await else {
            panic!("{name}: accepted");
        };
        let why = err.as_db_error().map(|d| d.message().to_string());
        let why = why.unwrap_or_else(|| err.to_string());
        assert!(why.contains("token"), "{name}: {why}");
        let res = certificate(token.clone()).await.unwrap();
        assert_eq!(res.status(), 401, "{name}");
    }

    // The Kubernetes API.
    let section = vigil_chaos::kube::kube_section("") + &tokens;
    let k = vigil_chaos::kube::Gateway::start_with(section, None).await;
    let namespaces = |token: String| {
        http()
            .get(format!("{}/api/v1/namespaces", k.server()))
            .bearer_auth(token)
            .send()
    };
    assert_ne!(namespaces(good).await.unwrap().status(), 401);
    for (name, token) in refused {
        let res = namespaces(token).await.unwrap();
        assert_eq!(res.status(), 401, "{name}");
    }
}

/// A person known to both providers: alice at the OIDC provider (subject `alice`, her
/// `preferred_username` `alice`) and at the IdP (subject her mail `alice@example.com`, taken
/// from the attribute `mail`, her `uid` `alice`). With the person key configured
/// (`identity.claims.person = "preferred_username"`, `identity.saml.person_attribute = "uid"`),
/// the SAML alice cannot approve what the OIDC alice asked for, although her subject differs
/// and she is in the approver group; bob (SAML) can, and the statement then runs once. An
/// agent's token (the gateway's audience) is not an operator's at the embedded coordinator,
/// nor is a token the SAML token endpoint issued to a workload, even one the IdP puts in the
/// approver group (bob's assertion for the token endpoint). PostgreSQL's log is the ground
/// truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t70_one_person_cannot_approve_their_own_request_under_another_identity() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let keys = Keys::new();
    let port = free_port();
    let console = format!("https://127.0.0.1:{port}");
    let idp = Idp::start(&first_sp_metadata(&console));
    let node = TestNode::start(NodeOptions {
        identity_extra: "[identity.claims]\nperson = \"preferred_username\"",
        protocols: Some(format!(
            "{}subject = \"mail\"\nperson_attribute = \"uid\"\n\
             [api]\nlisten = \"127.0.0.1:0\"\n",
            sections(&idp, &keys, port, &console)
        )),
        extra: r#"
[[policy.rules]]
id = "writes-need-people"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "people", wait_secs = 0, ttl_secs = 600 }
"#,
        ..NodeOptions::default()
    })
    .await;
    idp.register(&with_token_endpoint(&sp_metadata(&console).await, &console));
    let gw = env().get("VIGIL_PG_GATEWAY_USER");
    direct_superuser(&node.files.db)
        .await
        .batch_execute(&format!(
            "CREATE TABLE held (id int, v int); INSERT INTO held VALUES (1, 0);
             ALTER TABLE held OWNER TO {gw}"
        ))
        .await
        .unwrap();
    let coordinator = node.node.coordinator.join(",");
    let cli = |args: &[&str], token: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--coordinator", &coordinator, "--token", token]);
        vigil(&all)
    };
    // People's tokens, as `vigil login --saml` gets them (the console's audience).
    let saml_token = |user: &'static str| {
        let (node, console) = (&node, &console);
        async move {
            let home = tempfile::tempdir().unwrap();
            login_saml(console, node.cli_args(home.path()), user).await;
            let (status, token) = vigil(&["token", "--home", &home.path().display().to_string()]);
            assert_eq!(status, 0, "{token}");
            token.trim().to_string()
        }
    };

    // The OIDC alice's write is held.
    let log_start = pg_log_len();
    let update = "UPDATE held SET v = v + 1 WHERE id = 1";
    let (alice, _task) = node.client(&id_token("alice")).await.unwrap();
    let refusal = |e: tokio_postgres::Error| e.as_db_error().unwrap().message().to_string();
    let held = refusal(alice.simple_query(update).await.unwrap_err());
    let at = held
        .find("apr-")
        .unwrap_or_else(|| panic!("not held: {held}"));
    let id = held[at..].split_whitespace().next().unwrap().to_string();

    // The SAML alice: another subject, the same person. Refused, and nothing changes.
    let saml_alice = saml_token("alice").await;
    let (code, out) = cli(&["approvals", "approve", "--yes", &id], &saml_alice);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("own request"), "{out}");
    let (_, shown) = cli(&["approvals", "show", &id], &saml_alice);
    assert!(shown.contains("pending"), "{shown}");
    let again = refusal(alice.simple_query(update).await.unwrap_err());
    assert!(again.contains("apr-"), "still held: {again}");
    let ran = |from| {
        pg_executed(&node.files.db, from)
            .iter()
            .filter(|r| r.text == update)
            .count()
    };
    assert_eq!(ran(log_start), 0, "PostgreSQL ran nothing of it");

    // An agent's token is not an operator's: the gateway's audience is not an operator's,
    // whether the token comes from the OIDC provider or from the SAML token endpoint, and
    // although the workload's assertion puts it in the approver group (bob's groups).
    let agent = token_for("agent-ops", "agent-ops-secret").await;
    let token_url = format!("{console}/auth/saml/token");
    let (assertion, _) = saml_assertion(&idp, &token_url, "bob").await;
    let res = exchange(&token_url, &assertion).await;
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = res.json().await.unwrap();
    let workload = answer["access_token"].as_str().unwrap().to_string();
    for token in [&agent, &workload] {
        for args in [
            &["approvals", "list"][..],
            &["approvals", "approve", "--yes", &id][..],
        ] {
            let (code, out) = cli(args, token);
            assert_ne!(code, 0, "{out}");
            assert!(out.contains("audience"), "{out}");
        }
    }
    let (_, shown) = cli(&["approvals", "show", &id], &saml_alice);
    assert!(shown.contains("pending"), "{shown}");

    // Bob, another person of the approver group, approves; the statement runs, once.
    let bob = saml_token("bob").await;
    let (code, out) = cli(&["approvals", "approve", "--yes", &id], &bob);
    assert_eq!(code, 0, "{out}");
    let log_before_run = pg_log_len();
    alice.simple_query(update).await.unwrap();
    assert_eq!(ran(log_before_run), 1, "the approved statement ran once");
    assert_eq!(ran(log_start), 1);
}
