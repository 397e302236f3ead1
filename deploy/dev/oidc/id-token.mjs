#!/usr/bin/env node
// Non-interactive login for people against the dev OIDC provider: runs the real
// authorization code + PKCE (S256) flow for the public client vigil-cli over HTTP,
// submitting the dev login and consent forms with a cookie jar, exchanges the code
// and prints the ID token (just the JWT, one line).
//
//   node id-token.mjs --issuer http://127.0.0.1:55480 --user alice
//
// Options: --client (vigil-cli), --redirect-uri (http://127.0.0.1:8765/callback),
// --scope ("openid profile groups"), --json (print the whole token response).
// Defaults for --issuer come from env VIGIL_OIDC_ISSUER. Node 20 built-ins only;
// nothing listens on the redirect URI: the redirect is intercepted, not followed.

import * as crypto from 'node:crypto';
import { parseArgs } from 'node:util';

import { walk } from './person.mjs';

const { values: args } = parseArgs({
  options: {
    issuer: { type: 'string', default: process.env.VIGIL_OIDC_ISSUER },
    user: { type: 'string' },
    password: { type: 'string', default: 'dev' },
    client: { type: 'string', default: 'vigil-cli' },
    'redirect-uri': { type: 'string', default: 'http://127.0.0.1:8765/callback' },
    scope: { type: 'string', default: 'openid profile groups' },
    json: { type: 'boolean', default: false },
  },
  strict: true,
});

function die(msg) {
  console.error(`id-token.mjs: ${msg}`);
  process.exit(1);
}

if (!args.issuer) die('--issuer URL is required (or set VIGIL_OIDC_ISSUER)');
if (!args.user) die('--user LOGIN is required');

const issuer = args.issuer.replace(/\/+$/, '');
const redirectUri = args['redirect-uri'];

// ---- the flow ----
const discoveryRes = await fetch(`${issuer}/.well-known/openid-configuration`);
if (!discoveryRes.ok) die(`discovery failed: HTTP ${discoveryRes.status}`);
const discovery = await discoveryRes.json();

const verifier = crypto.randomBytes(32).toString('base64url');
const challenge = crypto.createHash('sha256').update(verifier).digest('base64url');
const state = crypto.randomBytes(16).toString('base64url');
const nonce = crypto.randomBytes(16).toString('base64url');

const authUrl = new URL(discovery.authorization_endpoint);
authUrl.search = new URLSearchParams({
  client_id: args.client,
  response_type: 'code',
  redirect_uri: redirectUri,
  scope: args.scope,
  code_challenge: challenge,
  code_challenge_method: 'S256',
  state,
  nonce,
  prompt: 'consent',
}).toString();

let callback;
try {
  callback = await walk(authUrl.href, {
    user: args.user,
    password: args.password,
    stopAt: (href) => href.startsWith(redirectUri),
  });
} catch (e) {
  die(e.message);
}
if (!(callback instanceof URL)) {
  die(`the flow ended at ${callback.url} (HTTP ${callback.status}): ${callback.body.slice(0, 500)}`);
}

const params = callback.searchParams;
if (params.get('error')) {
  die(`authorization error: ${params.get('error')}: ${params.get('error_description') ?? ''}`);
}
if (params.get('state') !== state) die('state mismatch in authorization response');
if (params.get('iss') && params.get('iss') !== discovery.issuer) die('iss mismatch in authorization response');
const code = params.get('code');
if (!code) die(`no code in redirect ${callback.href}`);

const tokenRes = await fetch(discovery.token_endpoint, {
  method: 'POST',
  headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
  body: new URLSearchParams({
    grant_type: 'authorization_code',
    code,
    redirect_uri: redirectUri,
    client_id: args.client,
    code_verifier: verifier,
  }),
});
const text = await tokenRes.text();
if (!tokenRes.ok) die(`token request failed: HTTP ${tokenRes.status}: ${text}`);
const tokens = JSON.parse(text);
if (!tokens.id_token) die(`no id_token in token response: ${text}`);

const claims = JSON.parse(Buffer.from(tokens.id_token.split('.')[1], 'base64url').toString());
if (claims.nonce !== nonce) die('nonce mismatch in ID token');

process.stdout.write(`${args.json ? JSON.stringify(tokens) : tokens.id_token}\n`);
