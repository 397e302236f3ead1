#!/usr/bin/env node
// Print a client_credentials access token (one line) from the dev OIDC provider.
//
//   node token.mjs --issuer http://127.0.0.1:55480 --client agent-reporting --secret agent-reporting-secret [--resource urn:vigil:gateway] [--scope S]
//
// Defaults come from env VIGIL_OIDC_ISSUER. Node 20 built-ins only.

import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    issuer: { type: 'string', default: process.env.VIGIL_OIDC_ISSUER },
    client: { type: 'string' },
    secret: { type: 'string' },
    resource: { type: 'string' },
    scope: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
  strict: true,
});

function die(msg) {
  console.error(`token.mjs: ${msg}`);
  process.exit(1);
}

if (!args.issuer) die('--issuer URL is required (or set VIGIL_OIDC_ISSUER)');
if (!args.client || !args.secret) die('--client ID and --secret SECRET are required');

const issuer = args.issuer.replace(/\/+$/, '');
const discoveryRes = await fetch(`${issuer}/.well-known/openid-configuration`);
if (!discoveryRes.ok) die(`discovery failed: HTTP ${discoveryRes.status}`);
const { token_endpoint: tokenEndpoint } = await discoveryRes.json();

const body = new URLSearchParams({ grant_type: 'client_credentials' });
if (args.resource) body.set('resource', args.resource);
if (args.scope) body.set('scope', args.scope);

const basic = Buffer.from(
  `${encodeURIComponent(args.client)}:${encodeURIComponent(args.secret)}`,
).toString('base64');

const res = await fetch(tokenEndpoint, {
  method: 'POST',
  headers: {
    authorization: `Basic ${basic}`,
    'content-type': 'application/x-www-form-urlencoded',
    accept: 'application/json',
  },
  body,
});
const text = await res.text();
if (!res.ok) die(`token request failed: HTTP ${res.status}: ${text}`);
const json = JSON.parse(text);
if (!json.access_token) die(`no access_token in response: ${text}`);
process.stdout.write(`${args.json ? JSON.stringify(json) : json.access_token}\n`);
