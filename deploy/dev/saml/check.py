#!/usr/bin/env python3
"""End-to-end check of Vigil's dev SAML IdP (deploy/dev/saml/idp.sh), without Vigil.

    python3 deploy/dev/saml/check.py IDP_BASE_URL [options]
    e.g. python3 deploy/dev/saml/check.py http://127.0.0.1:35510/simplesaml/

Plays the SP whose metadata the IdP was started with (defaults: entity id
https://127.0.0.1:9443/saml/metadata, ACS https://127.0.0.1:9443/saml/acs, HTTP-POST) the way
a browser does:
  1. GET the IdP metadata (IDP_BASE_URL + saml2/idp/metadata.php): entity id, HTTP-Redirect SSO
     endpoint, signing certificate;
  2. send an unsigned AuthnRequest by HTTP-Redirect (deflate + base64 + URL-encode, RelayState);
     the IdP redirects to its login form (module.php/core/loginuserpass.php?AuthState=...);
  3. POST username, password and the form's hidden AuthState to the form's action (`?`, i.e.
     the login page's own path without query), with the IdP's cookies;
  4. take SAMLResponse and RelayState from the auto-submit form (action = the ACS URL).
Then it checks the decoded Response: status Success, Destination = ACS, InResponseTo = request
id, Issuer = IdP entity id, Response and Assertion both signed with RSA-SHA256 (and the
signatures verify with `xmlsec1` against the certificate in the IdP's metadata), Audience = SP
entity id, SubjectConfirmationData Recipient = ACS and InResponseTo, NameID and attributes as the
user is configured. A wrong password must get the login form back, not a SAMLResponse.

Standard library only (plus the xmlsec1 CLI, Debian package `xmlsec1`; --no-xmlsec skips it).
Prints the facts of each assertion and exits 1 if any check fails (2 on a usage error).
Reusable from Python: login(...) returns the decoded Response XML, check_response(...) the
facts and the list of failures.
"""

import argparse
import base64
import datetime
import html.parser
import http.cookiejar
import json
import os
import secrets
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zlib

NS = {
    "md": "urn:oasis:names:tc:SAML:2.0:metadata",
    "samlp": "urn:oasis:names:tc:SAML:2.0:protocol",
    "saml": "urn:oasis:names:tc:SAML:2.0:assertion",
    "ds": "http://www.w3.org/2000/09/xmldsig#",
}
REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"

# What deploy/dev/saml/idp.sh configures (password `dev` for all).
USERS = {
    "alice": {"uid": ["alice"], "mail": ["alice@example.com"], "groups": ["approvers", "people"]},
    "bob": {"uid": ["bob"], "mail": ["bob@example.com"], "groups": ["people"]},
    "dave": {"uid": ["dave"], "mail": ["dave@example.com"], "groups": ["auditors"]},
    "agent-saml": {"uid": ["agent-saml"], "mail": ["agent-saml@example.com"], "groups": ["agents"],
                   "model": ["gpt-5"], "agent": ["true"]},
}
PASSWORD = "dev"


class FormParser(html.parser.HTMLParser):
    """The first <form>'s action and its <input name=... value=...> fields."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action"), "method": (a.get("method") or "get").lower(),
                               "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""


def parse_form(body):
    p = FormParser()
    p.feed(body)
    return p.forms[0] if p.forms else None


class Client:
    """A cookie-keeping HTTP client that follows redirects (like a browser, without JS)."""

    def __init__(self):
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, url, data=None):
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            with self.opener.open(urllib.request.Request(url, data=body), timeout=30) as r:
                return r.status, r.geturl(), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.geturl(), e.read().decode("utf-8", "replace")


def fetch_metadata(base):
    url = urllib.parse.urljoin(base, "saml2/idp/metadata.php")
    with urllib.request.urlopen(url, timeout=30) as r:
        root = ET.fromstring(r.read())
    idp = root.find("md:IDPSSODescriptor", NS)
    sso = {e.get("Binding"): e.get("Location") for e in idp.findall("md:SingleSignOnService", NS)}
    cert = None
    for kd in idp.findall("md:KeyDescriptor", NS):
        if kd.get("use") in (None, "signing"):
            cert = "".join(kd.find(".//ds:X509Certificate", NS).text.split())
            break
    return {"url": url, "entity_id": root.get("entityID"), "sso": sso, "cert": cert,
            "nameid_formats": [e.text for e in idp.findall("md:NameIDFormat", NS)]}


def authn_request(req_id, sp_entity_id, acs, destination, nameid_format=None, force_authn=False):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = ('<samlp:NameIDPolicy AllowCreate="true"%s/>'
              % (' Format="%s"' % nameid_format if nameid_format else ""))
    force = ' ForceAuthn="true"' if force_authn else ""
    return ('<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
            'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
            f'ID="{req_id}" Version="2.0" IssueInstant="{now}" Destination="{destination}"{force} '
            f'AssertionConsumerServiceURL="{acs}" ProtocolBinding="{POST}">'
            f'<saml:Issuer>{sp_entity_id}</saml:Issuer>{policy}</samlp:AuthnRequest>')


def redirect_encode(xml):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw DEFLATE, as the HTTP-Redirect binding wants
    return base64.b64encode(c.compress(xml.encode()) + c.flush()).decode()


def login(base, meta, user, password, sp_entity_id, acs, nameid_format=None, relay_state=None,
          client=None, force_authn=False):
    """Drives one SP-initiated login. Returns a dict: request_id, relay_state, login_url,
    login_fields (the form's field names), acs_action, and response_xml (bytes) or None with
    the final page in `page` when no SAMLResponse came back. Pass the same `client` (a Client)
    again to reuse the IdP session: then the IdP answers at once, without its login form
    (login_url None), unless force_authn."""
    sso = meta["sso"].get(REDIRECT)
    if not sso:
        raise RuntimeError("the IdP metadata has no HTTP-Redirect SingleSignOnService")
    req_id = "_" + secrets.token_hex(16)
    relay_state = relay_state or "rs-" + secrets.token_hex(8)
    query = urllib.parse.urlencode({
        "SAMLRequest": redirect_encode(authn_request(req_id, sp_entity_id, acs, sso, nameid_format,
                                                     force_authn)),
        "RelayState": relay_state,
    })
    client = client or Client()
    status, login_url, body = client.request(sso + ("&" if "?" in sso else "?") + query)
    out = {"request_id": req_id, "relay_state": relay_state, "login_url": login_url,
           "response_xml": None, "page": body}
    form = parse_form(body)
    if status == 200 and form is not None and "SAMLResponse" in form["fields"]:
        # an IdP session exists already: no login form
        out.update(login_url=None, login_fields=[], acs_action=form["action"],
                   relay_state_back=form["fields"].get("RelayState"),
                   response_xml=base64.b64decode(form["fields"]["SAMLResponse"]))
        return out
    if status != 200 or form is None or "AuthState" not in form["fields"]:
        raise RuntimeError(f"no login form after the AuthnRequest (HTTP {status} at {login_url}):\n"
                           f"{body[:2000]}")
    out["login_fields"] = sorted(form["fields"])
    action = urllib.parse.urljoin(login_url, form["action"] or "")
    fields = {k: v for k, v in form["fields"].items() if k == "AuthState"}
    fields.update(username=user, password=password)
    status, url, body = client.request(action, fields)
    out["page"] = body
    form = parse_form(body)
    if status != 200 or form is None or "SAMLResponse" not in form["fields"]:
        return out
    out["acs_action"] = form["action"]
    out["relay_state_back"] = form["fields"].get("RelayState")
    out["response_xml"] = base64.b64decode(form["fields"]["SAMLResponse"])
    return out


def signature_facts(elem):
    """(signature method, reference URI) of elem's enveloped ds:Signature, or None."""
    sig = elem.find("ds:Signature", NS)
    if sig is None:
        return None
    method = sig.find("ds:SignedInfo/ds:SignatureMethod", NS)
    ref = sig.find("ds:SignedInfo/ds:Reference", NS)
    return {"algorithm": method.get("Algorithm") if method is not None else None,
            "reference": ref.get("URI") if ref is not None else None,
            "digest": (ref.find("ds:DigestMethod", NS).get("Algorithm") if ref is not None else None)}


def xmlsec_verify(xml_bytes, cert_b64, node_xpath):
    """Verifies the ds:Signature selected by node_xpath with the IdP certificate. (ok, output)"""
    with tempfile.TemporaryDirectory() as tmp:
        cert = os.path.join(tmp, "idp.crt")
        doc = os.path.join(tmp, "response.xml")
        with open(cert, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\n")
            for i in range(0, len(cert_b64), 64):
                f.write(cert_b64[i:i + 64] + "\n")
            f.write("-----END CERTIFICATE-----\n")
        with open(doc, "wb") as f:
            f.write(xml_bytes)
        # --enabled-key-data key-name: ignore the certificate the signature carries in its
        # KeyInfo (self-signed: xmlsec1 would complain that it is untrusted), verify with the one
        # from the metadata only. --node-xpath picks which of the two signatures to verify.
        cmd = ["xmlsec1", "--verify", "--enabled-key-data", "key-name", "--pubkey-cert-pem", cert,
               "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:protocol:Response",
               "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
               "--node-xpath", node_xpath, doc]
        p = subprocess.run(cmd, capture_output=True, text=True)
        out = (p.stdout + p.stderr).strip()
        return p.returncode == 0 and out.splitlines()[:1] == ["OK"], out


def check_response(xml_bytes, meta, req_id, sp_entity_id, acs, user, expected_nameid,
                   expected_format, verify_xmlsec=True):
    """Returns (facts, failures)."""
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    root = ET.fromstring(xml_bytes)
    expect("root element", root.tag, "{%s}Response" % NS["samlp"])
    assertions = root.findall("saml:Assertion", NS)
    if root.find("saml:EncryptedAssertion", NS) is not None:
        failures.append("the assertion is encrypted")
    expect("number of assertions", len(assertions), 1)
    if not assertions:
        return {}, failures
    a = assertions[0]
    status = root.find("samlp:Status/samlp:StatusCode", NS)
    subject = a.find("saml:Subject", NS)
    nameid = subject.find("saml:NameID", NS)
    scd = subject.find("saml:SubjectConfirmation/saml:SubjectConfirmationData", NS)
    conditions = a.find("saml:Conditions", NS)
    attrs, name_formats = {}, {}
    for at in a.findall("saml:AttributeStatement/saml:Attribute", NS):
        attrs[at.get("Name")] = [v.text for v in at.findall("saml:AttributeValue", NS)]
        name_formats[at.get("Name")] = at.get("NameFormat")
    facts = {
        "user": user,
        "response_id": root.get("ID"),
        "destination": root.get("Destination"),
        "in_response_to": root.get("InResponseTo"),
        "issuer": root.findtext("saml:Issuer", namespaces=NS),
        "status": status.get("Value") if status is not None else None,
        "response_signature": signature_facts(root),
        "assertion_id": a.get("ID"),
        "assertion_issuer": a.findtext("saml:Issuer", namespaces=NS),
        "assertion_signature": signature_facts(a),
        "nameid": nameid.text if nameid is not None else None,
        "nameid_format": nameid.get("Format") if nameid is not None else None,
        "nameid_sp_name_qualifier": nameid.get("SPNameQualifier") if nameid is not None else None,
        "recipient": scd.get("Recipient") if scd is not None else None,
        "scd_in_response_to": scd.get("InResponseTo") if scd is not None else None,
        "scd_not_on_or_after": scd.get("NotOnOrAfter") if scd is not None else None,
        "not_before": conditions.get("NotBefore") if conditions is not None else None,
        "not_on_or_after": conditions.get("NotOnOrAfter") if conditions is not None else None,
        "audiences": [e.text for e in a.findall("saml:Conditions/saml:AudienceRestriction/saml:Audience", NS)],
        "authn_context": a.findtext("saml:AuthnStatement/saml:AuthnContext/saml:AuthnContextClassRef",
                                    namespaces=NS),
        "session_index": (a.find("saml:AuthnStatement", NS).get("SessionIndex")
                          if a.find("saml:AuthnStatement", NS) is not None else None),
        "attributes": attrs,
        "attribute_name_formats": sorted(set(name_formats.values())),
    }
    expect("Response Destination", facts["destination"], acs)
    expect("Response InResponseTo", facts["in_response_to"], req_id)
    expect("Response Issuer", facts["issuer"], meta["entity_id"])
    expect("Status", facts["status"], SUCCESS)
    expect("Assertion Issuer", facts["assertion_issuer"], meta["entity_id"])
    for what, sig, ref in (("Response", facts["response_signature"], facts["response_id"]),
                           ("Assertion", facts["assertion_signature"], facts["assertion_id"])):
        if sig is None:
            failures.append(f"{what} is not signed")
            continue
        expect(f"{what} SignatureMethod", sig["algorithm"], RSA_SHA256)
        expect(f"{what} signature Reference", sig["reference"], "#" + (ref or ""))
    expect("NameID", facts["nameid"], expected_nameid)
    expect("NameID Format", facts["nameid_format"], expected_format)
    expect("SubjectConfirmationData Recipient", facts["recipient"], acs)
    expect("SubjectConfirmationData InResponseTo", facts["scd_in_response_to"], req_id)
    expect("Audience", facts["audiences"], [sp_entity_id])
    want_attrs = USERS.get(user)
    if want_attrs is not None:
        expect("attributes", {k: sorted(v) for k, v in attrs.items()},
               {k: sorted(v) for k, v in want_attrs.items()})
    expect("attribute NameFormat", facts["attribute_name_formats"], [BASIC])
    if verify_xmlsec:
        for what, xpath in (
                ("Response", "/*[local-name()='Response']/*[local-name()='Signature']"),
                ("Assertion", "/*[local-name()='Response']/*[local-name()='Assertion']"
                              "/*[local-name()='Signature']")):
            ok, output = xmlsec_verify(xml_bytes, meta["cert"], xpath)
            facts[f"xmlsec1_{what.lower()}"] = " ".join(output.splitlines()[:2])
            if not ok:
                failures.append(f"xmlsec1 does not verify the {what} signature: {output}")
            # and a tampered copy must not verify
            tampered = xml_bytes.replace(b">%s<" % facts["nameid"].encode(), b">x%s<" % facts["nameid"].encode())
            ok, output = xmlsec_verify(tampered, meta["cert"], xpath)
            if ok or tampered == xml_bytes:
                failures.append(f"xmlsec1 verifies the {what} signature of a tampered Response")
    return facts, failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="IdP base URL, e.g. http://127.0.0.1:35510/simplesaml/")
    ap.add_argument("--sp-entity-id", default="https://127.0.0.1:9443/saml/metadata")
    ap.add_argument("--acs", default="https://127.0.0.1:9443/saml/acs")
    ap.add_argument("--user", action="append",
                    help="user to log in as (repeatable; default: every configured user)")
    ap.add_argument("--password", default=PASSWORD)
    ap.add_argument("--nameid-format", choices=["none", UNSPECIFIED, EMAIL, PERSISTENT], default="none",
                    help="NameIDPolicy Format to request (default: none, i.e. the IdP's default)")
    ap.add_argument("--no-xmlsec", action="store_true", help="skip the xmlsec1 signature verification")
    ap.add_argument("--dump", action="store_true", help="print each decoded Response XML")
    args = ap.parse_args()
    base = args.base if args.base.endswith("/") else args.base + "/"
    users = args.user or list(USERS)
    fmt = None if args.nameid_format == "none" else args.nameid_format

    failures = []
    meta = fetch_metadata(base)
    print(json.dumps({"metadata_url": meta["url"], "entity_id": meta["entity_id"], "sso": meta["sso"],
                      "nameid_formats": meta["nameid_formats"]}, indent=2))
    if meta["entity_id"] != meta["url"]:
        failures.append(f"IdP entity id {meta['entity_id']!r} is not its metadata URL {meta['url']!r}")
    if not meta["cert"]:
        failures.append("no signing certificate in the IdP metadata")

    for user in users:
        r = login(base, meta, user, args.password, args.sp_entity_id, args.acs, fmt)
        if r["response_xml"] is None:
            failures.append(f"{user}: no SAMLResponse after posting the login form")
            print(r["page"][:2000], file=sys.stderr)
            continue
        if args.dump:
            print(r["response_xml"].decode())
        want = USERS.get(user, {})
        if fmt == EMAIL:
            expected_nameid, expected_format = (want.get("mail") or [None])[0], EMAIL
        else:
            expected_nameid, expected_format = (want.get("uid") or [user])[0], fmt or UNSPECIFIED
        facts, fails = check_response(r["response_xml"], meta, r["request_id"], args.sp_entity_id,
                                      args.acs, user, expected_nameid, expected_format,
                                      verify_xmlsec=not args.no_xmlsec)
        if r["acs_action"] != args.acs:
            fails.append(f"auto-submit form action: got {r['acs_action']!r}, want {args.acs!r}")
        if r["relay_state_back"] != r["relay_state"]:
            fails.append(f"RelayState: got {r['relay_state_back']!r}, want {r['relay_state']!r}")
        facts.update(request_id=r["request_id"], login_url=(r["login_url"] or "").split("?")[0],
                     login_fields=r["login_fields"], acs_action=r["acs_action"],
                     relay_state=r["relay_state_back"])
        print(json.dumps(facts, indent=2))
        failures += [f"{user}: {f}" for f in fails]

    # the IdP session: a second AuthnRequest from the same browser gets a Response at once
    # (same user, new InResponseTo), unless ForceAuthn="true", which shows the login form again
    client = Client()
    first = login(base, meta, users[0], args.password, args.sp_entity_id, args.acs, fmt, client=client)
    again = login(base, meta, users[0], args.password, args.sp_entity_id, args.acs, fmt, client=client)
    forced = login(base, meta, users[0], args.password, args.sp_entity_id, args.acs, fmt, client=client,
                   force_authn=True)
    if first["response_xml"] is None or first["login_url"] is None:
        failures.append(f"{users[0]}: the first login of a session did not go through the login form")
    elif again["response_xml"] is None or again["login_url"] is not None:
        failures.append(f"{users[0]}: a second AuthnRequest in the same IdP session did not get a Response at once")
    elif forced["response_xml"] is None or forced["login_url"] is None:
        failures.append(f"{users[0]}: ForceAuthn did not show the login form again")
    else:
        root = ET.fromstring(again["response_xml"])
        if root.get("InResponseTo") != again["request_id"]:
            failures.append(f"{users[0]}: the session's second Response has InResponseTo "
                            f"{root.get('InResponseTo')!r}, want {again['request_id']!r}")
        else:
            print(f"IdP session for {users[0]}: second AuthnRequest answered without the login form, "
                  "ForceAuthn shows it again (ok)")

    # a wrong password gets the login form back, no SAMLResponse
    r = login(base, meta, users[0], args.password + "-wrong", args.sp_entity_id, args.acs, fmt)
    if r["response_xml"] is not None:
        failures.append(f"{users[0]}: a wrong password got a SAMLResponse")
    elif "AuthState" not in (parse_form(r["page"]) or {"fields": {}})["fields"]:
        failures.append(f"{users[0]}: a wrong password did not get the login form back")
    else:
        print(f"wrong password for {users[0]}: login form shown again (ok)")

    if failures:
        print("FAILED:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        sys.exit(1)
    print(f"OK: {len(users)} login(s) checked")


if __name__ == "__main__":
    main()
