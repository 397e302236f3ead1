#!/usr/bin/env node
// A stand-in for a person's web browser, for tests of `vigil login`: set
//   BROWSER="node deploy/dev/oidc/browser.mjs --user alice"
// and `vigil login` "opens" its authorization URL here. It logs in at the dev OIDC
// provider, consents, and follows every redirect to the end, the last one to the loopback
// address `vigil login` listens on, as a browser would. With a device flow's verification
// URL it confirms the code the same way. Prints the last page's status and title.

import { parseArgs } from 'node:util';

import { walk } from './person.mjs';

const { values: args, positionals } = parseArgs({
  options: {
    user: { type: 'string' },
    password: { type: 'string', default: 'dev' },
  },
  allowPositionals: true,
  strict: true,
});

if (!args.user || positionals.length !== 1) {
  console.error('usage: browser.mjs --user LOGIN [--password P] URL');
  process.exit(2);
}

try {
  const end = await walk(positionals[0], { user: args.user, password: args.password });
  const title = end.body.match(/<title>([^<]*)<\/title>/i)?.[1] ?? '';
  console.error(`browser.mjs: ${end.status} ${end.url} ${title}`);
  process.exit(end.status === 200 ? 0 : 1);
} catch (e) {
  console.error(`browser.mjs: ${e.message}`);
  process.exit(1);
}
