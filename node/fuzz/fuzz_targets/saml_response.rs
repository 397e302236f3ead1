//! Arbitrary bytes as a SAML response (HTTP-POST binding) and as a bearer assertion (RFC 7522):
//! through the size cap, the refusal of DTDs, comments and processing instructions, the
//! structure check (one Response holding one Assertion) and samael's parsing and signature
//! verification on the system xmlsec1. Every input must be refused (none is signed by the
//! fuzz IdP's key), and nothing may panic or crash.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vigil_node::core::saml::{SamlConfig, Sp};

/// A throwaway IdP certificate: nothing the fuzzer makes is signed by its key.
const CERT: &str = "MIIDBzCCAe+gAwIBAgIUEAhRCnOTyfAm9G6P4D+kfKTIVigwDQYJKoZIhvcNAQELBQAwEzERMA8GA1UEAwwIZnV6eiBJZFAwHhcNMjYxMjA0MTcxNDU4WhcNMzYxMjAxMTcxNDU4WjATMREwDwYDVQQDDAhmdXp6IElkUDCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAL6IcTzregEZXsId27FKcys45at+GOtZ0KU/RMDxHdwKF3Sc894GGbEXzDh3OSqXccFJ+o3qumfaSwMiGvYEiFd7SN78NAnI8edHOplE1TlP9qnJ/TWmZGisq418+9Q8MQW1CMn/PXsFmGshgB7qXeiE4x1gMh3BPN5eYHJYeATDIMBdBnQzPvPvFLQJWEvNmHobCuQePT0RX2Yz7hxq9MXHEh1L5Bdkh2v1FtQpYTSCswomwVjUrkgbFNCZERl7w/qimuZS/a4QxQC26l4iFu2I9RuxplcYXKUxUxHuyaOSauXbgmHmlOhSOAhpnSg5VYUz515DGjtrsA9QAHKqXhsCAwEAAaNTMFEwHQYDVR0OBBYEFFL1uWQqrj59aFmPzTV6kUDLZvaTMB8GA1UdIwQYMBaAFFL1uWQqrj59aFmPzTV6kUDLZvaTMA8GA1UdEwEB/wQFMAMBAf8wDQYJKoZIhvcNAQELBQADggEBADeRXeRs4Q2pbwbmyDaO+t+OYrDbRkhbnxiPchXhnVZ+WzONC8iizz4+sGVVchcUu9o5K9j9nTx3Dqdv0Hb+gJTLG8/iA15UMy+Z8EefMY9HJ5cguwYyy3gELh7cMdKD5FBQhAt1ONIu8jP2EeuwbWOKrjbkHrcYyQcbiL/hrBXSgYZSPMgmZEznhXCHjrI5P31cYZkP0X8BQHLf0Bj0tRyHJxDz8uBp+TzvMVt8HA1ZKcVhSVF69fHO6cGoDfNgdfPJbybtp7r8aFDCRUYPBqpGplxl70OXPjEUkpitkV8QYiWHlOGX8QCaAkjeaAePZd4GJUtyxSpwX7VyqoTnImM=";

fn sp() -> &'static Sp {
    static SP: OnceLock<Sp> = OnceLock::new();
    SP.get_or_init(|| {
        let config: SamlConfig = toml::from_str("idp_metadata = \"fuzz.xml\"").unwrap();
        let metadata = format!(
            r#"<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="https://idp.example/saml"><md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"><md:KeyDescriptor use="signing"><ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:X509Data><ds:X509Certificate>{CERT}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor><md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" Location="https://idp.example/sso"/></md:IDPSSODescriptor></md:EntityDescriptor>"#
        );
        Sp::from_metadata(&config, "https://vigil.example", &metadata).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let sp = sp();
    let standard = base64::engine::general_purpose::STANDARD.encode(data);
    assert!(sp.verify(&standard, "_request").is_err());
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data);
    assert!(sp.verify_bearer(&url_safe).is_err());
});
