#!/usr/bin/env node
// Development OIDC provider for Vigil's tests and quick start. NOT for production.
//
//   node server.mjs --port 55480 --key signing-key.pem --kid dev-key-1 [--host 127.0.0.1] [--issuer URL]
//
// (or env OIDC_PORT / OIDC_KEY / OIDC_KID / OIDC_HOST / OIDC_ISSUER). Listens on HOST:PORT
// (default 127.0.0.1). Issuer: --issuer, by default http://HOST:PORT; give it when the provider
// is reached under another name than the address it listens on (a container: --host 0.0.0.0
// --issuer http://oidc:8080, as deploy/compose does).
//
// - Agents: confidential clients using the client_credentials grant. Every token
//   request gets a JWT access token (RFC 9068, typ at+jwt, RS256) for the default
//   resource urn:vigil:gateway, carrying client_id, model, model_version, groups.
// - People: public native client vigil-cli (authorization code + PKCE S256 on any
//   loopback port, or the device authorization grant). The dev interactions accept any
//   login name and any password; the ID token carries sub = login name and groups.
// - The web console: confidential web client vigil-console (secret vigil-console-secret,
//   authorization code + PKCE S256). Its redirect URI is https://127.0.0.1:PORT/auth/callback on
//   any port (tests start nodes on ephemeral ports), as RFC 8252 allows native apps on the
//   loopback; a dev-only relaxation. More redirect URIs (a Compose or cluster host name):
//   OIDC_CONSOLE_REDIRECT_URIS, space-separated.
// - GET /__dev/jwks-hits returns how many HTTP requests reached the JWKS endpoint.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const AUDIENCE = 'urn:vigil:gateway';
const ACCESS_TOKEN_TTL = 600;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    key: { type: 'string' },
    kid: { type: 'string' },
    host: { type: 'string' },
    issuer: { type: 'string' },
  },
  strict: true,
});

const port = Number(args.port ?? process.env.OIDC_PORT ?? 55480);
const keyPath = args.key ?? process.env.OIDC_KEY;
const kid = args.kid ?? process.env.OIDC_KID ?? 'dev-key-1';
const host = args.host ?? process.env.OIDC_HOST ?? '127.0.0.1';

if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error(`server.mjs: invalid --port ${args.port ?? process.env.OIDC_PORT}`);
  process.exit(2);
}
if (!keyPath) {
  console.error('server.mjs: --key PRIVATE_KEY_PEM_PATH (or OIDC_KEY) is required');
  process.exit(2);
}

const privateKey = crypto.createPrivateKey(fs.readFileSync(keyPath));
if (privateKey.asymmetricKeyType !== 'rsa') {
  console.error(`server.mjs: ${keyPath} is not an RSA private key`);
  process.exit(2);
}
const signingJwk = {
  ...privateKey.export({ format: 'jwk' }),
  kid,
  alg: 'RS256',
  use: 'sig',
};

const issuer = args.issuer ?? process.env.OIDC_ISSUER ?? `http://${host}:${port}`;
if (!/^https?:\/\/[^/]+$/.test(issuer)) {
  console.error(`server.mjs: --issuer must be http(s)://HOST[:PORT] without a path, not ${issuer}`);
  process.exit(2);
}

const CONSOLE_CLIENT = 'vigil-console';
const CONSOLE_LOOPBACK = 'https://127.0.0.1/auth/callback';

// Agents (client_credentials) and their custom metadata.
const agents = [
  {
    client_id: 'agent-reporting',
    client_secret: 'agent-reporting-secret',
    model: 'gpt-5',
    model_version: '2026-08',
    groups: ['analysts'],
  },
  {
    client_id: 'agent-ops',
    client_secret: 'agent-ops-secret',
    model: 'claude-opus',
    model_version: '4.5',
    groups: ['ops', 'dba'],
  },
  {
    client_id: 'agent-denied',
    client_secret: 'agent-denied-secret',
    model: 'tiny',
    model_version: '1',
    groups: [],
  },
];

// People: groups per login name (any other login name gets no groups).
const peopleGroups = {
  alice: ['dba', 'approvers'],
  bob: ['analysts'],
  carol: ['vigil-admins'],
  dave: ['auditors'],
};

const clients = [
  ...agents.map((a) => ({
    ...a,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic', // client_secret_post is accepted too
  })),
  {
    client_id: 'vigil-cli',
    // A native app (RFC 8252): a loopback redirect URI matches on any port, so `vigil login`
    // listens on an ephemeral one.
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1:8765/callback'],
    scope: 'openid profile groups',
  },
  {
    client_id: CONSOLE_CLIENT,
    client_secret: 'vigil-console-secret',
    application_type: 'web',
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: [
      CONSOLE_LOOPBACK,
      ...(process.env.OIDC_CONSOLE_REDIRECT_URIS ?? '').split(/\s+/).filter(Boolean),
    ],
    scope: 'openid profile groups',
  },
];

const configuration = {
  clients,
  jwks: { keys: [signingJwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },

  extraClientMetadata: {
    properties: ['model', 'model_version', 'groups'],
    validator(ctx, key, value) {
      if (key === 'groups' && value !== undefined && !Array.isArray(value)) {
        throw new Error('groups must be an array');
      }
    },
  },

  async findAccount(ctx, id) {
    const groups = peopleGroups[id] ?? [];
    return {
      accountId: id,
      async claims() {
        return {
          sub: id, name: id, preferred_username: id, groups,
        };
      },
    };
  },

  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // Put the scope-granted claims (groups) into the ID token itself.
  conformIdTokenClaims: false,

  async extraTokenClaims(ctx, token) {
    if (token.accountId) {
      return { groups: peopleGroups[token.accountId] ?? [] };
    }
    const client = ctx?.oidc?.client?.clientId === token.clientId
      ? ctx.oidc.client
      : await provider.Client.find(token.clientId);
    if (!client || client.model === undefined) return undefined;
    return {
      client_id: client.clientId,
      model: client.model,
      model_version: client.model_version,
      groups: client.groups ?? [],
    };
  },

  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      async defaultResource(ctx, client, oneOf) {
        return oneOf ?? AUDIENCE;
      },
      async useGrantedResource() {
        return true;
      },
      async getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== AUDIENCE) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: 'vigil',
          audience: AUDIENCE,
          accessTokenTTL: ACCESS_TOKEN_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },

  ttl: {
    AccessToken: ACCESS_TOKEN_TTL,
    ClientCredentials: ACCESS_TOKEN_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    DeviceCode: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },

  renderError(ctx, out, error) {
    ctx.type = 'json';
    ctx.body = out;
    if (error && !(error instanceof errors.OIDCProviderError)) {
      console.error(error);
    }
  },
};

const provider = new Provider(issuer, configuration);
provider.on('server_error', (ctx, err) => console.error('server_error', err));

// The console's loopback redirect URI matches on any port (see the header).
const redirectUriAllowed = provider.Client.prototype.redirectUriAllowed;
provider.Client.prototype.redirectUriAllowed = function allowed(value) {
  if (redirectUriAllowed.call(this, value)) return true;
  if (this.clientId !== CONSOLE_CLIENT) return false;
  try {
    const url = new URL(value);
    url.port = '';
    return url.href === CONSOLE_LOOPBACK;
  } catch {
    return false;
  }
};

const jwksPath = new URL(provider.urlFor('jwks')).pathname;
const callback = provider.callback();
let jwksHits = 0;

const server = http.createServer((req, res) => {
  const path = (req.url ?? '/').split('?', 1)[0];
  if (path === '/__dev/jwks-hits') {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
    res.end(String(jwksHits));
    return;
  }
  if (path === jwksPath) jwksHits += 1;
  callback(req, res);
});

server.listen(port, host, () => {
  console.log(`issuer=${issuer} kid=${kid} jwks=${jwksPath}`);
  console.log('ready');
});
server.on('error', (err) => {
  console.error(`server.mjs: ${err.message}`);
  process.exit(1);
});

function shutdown(signal) {
  console.log(`${signal} received, exiting`);
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
