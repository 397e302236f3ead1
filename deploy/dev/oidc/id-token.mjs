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

// ---- minimal cookie jar (single host; honours Path, Max-Age/Expires deletion) ----
const jar = new Map(); // `${name}\0${path}` -> { name, value, path }

function storeCookies(res, requestUrl) {
  for (const line of res.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';');
    const eq = pair.indexOf('=');
    if (eq < 0) continue;
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    let path;
    let expired = false;
    for (const attr of attrs) {
      const [k, v = ''] = attr.split('=');
      const key = k.trim().toLowerCase();
      if (key === 'path') path = v.trim();
      if (key === 'max-age' && Number(v) <= 0) expired = true;
      if (key === 'expires' && Date.parse(v) <= Date.now()) expired = true;
    }
    if (!path || !path.startsWith('/')) {
      const p = new URL(requestUrl).pathname;
      path = p.slice(0, p.lastIndexOf('/')) || '/';
    }
    const id = `${name}\0${path}`;
    if (expired || value === '') jar.delete(id);
    else jar.set(id, { name, value, path });
  }
}

function cookieHeader(url) {
  const { pathname } = new URL(url);
  const matching = [...jar.values()]
    .filter(({ path }) => pathname === path
      || pathname.startsWith(path.endsWith('/') ? path : `${path}/`))
    .sort((a, b) => b.path.length - a.path.length);
  return matching.map(({ name, value }) => `${name}=${value}`).join('; ');
}

async function request(url, init = {}) {
  const headers = { ...(init.headers ?? {}) };
  const cookie = cookieHeader(url);
  if (cookie) headers.cookie = cookie;
  const res = await fetch(url, { ...init, headers, redirect: 'manual' });
  storeCookies(res, url);
  return res;
}

// ---- tiny HTML form reader for the dev interaction pages ----
function decodeHtml(s) {
  return s
    .replace(/&#x([0-9a-f]+);/gi, (_, h) => String.fromCodePoint(parseInt(h, 16)))
    .replace(/&#(\d+);/g, (_, d) => String.fromCodePoint(Number(d)))
    .replace(/&quot;/g, '"')
    .replace(/&#39;|&apos;/g, "'")
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

function attr(tag, name) {
  const m = tag.match(new RegExp(`\\s${name}\\s*=\\s*(?:"([^"]*)"|'([^']*)')`, 'i'));
  return m ? decodeHtml(m[1] ?? m[2]) : undefined;
}

function readForm(html, baseUrl) {
  const formMatch = html.match(/<form\b[^>]*>([\s\S]*?)<\/form>/i);
  if (!formMatch) return undefined;
  const formTag = formMatch[0].slice(0, formMatch[0].indexOf('>') + 1);
  const action = new URL(attr(formTag, 'action') ?? baseUrl, baseUrl).href;
  const fields = new URLSearchParams();
  for (const [input] of formMatch[1].matchAll(/<input\b[^>]*>/gi)) {
    const name = attr(input, 'name');
    if (!name) continue;
    fields.set(name, attr(input, 'value') ?? '');
  }
  return { action, fields };
}

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

let url = authUrl.href;
let res = await request(url);
let callback;

for (let step = 0; step < 20 && !callback; step += 1) {
  if (res.status >= 300 && res.status < 400) {
    const location = res.headers.get('location');
    if (!location) die(`redirect without Location from ${url}`);
    const next = new URL(location, url);
    if (next.href.startsWith(redirectUri)) {
      callback = next;
      break;
    }
    url = next.href;
    res = await request(url);
    continue;
  }

  const body = await res.text();
  if (res.status !== 200) die(`unexpected HTTP ${res.status} from ${url}: ${body.slice(0, 500)}`);
  const form = readForm(body, url);
  if (!form) die(`no form on page ${url}: ${body.slice(0, 500)}`);
  if (form.fields.has('login')) form.fields.set('login', args.user);
  if (form.fields.has('password')) form.fields.set('password', args.password);

  url = form.action;
  res = await request(url, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: form.fields.toString(),
  });
}

if (!callback) die('authorization flow did not reach the redirect URI');
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
