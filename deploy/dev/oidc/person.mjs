// A person at a browser, for the dev OIDC provider's pages: a cookie jar, a reader for the
// dev interaction forms, and a walk that follows redirects and fills in the login, consent
// and device-confirmation forms the way a person would. Node 20 built-ins only.
//
// Used by id-token.mjs (which stops at the redirect URI) and browser.mjs (which follows it,
// like a real browser handing the code to `vigil login`'s loopback listener).

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

export async function request(url, init = {}) {
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

// Walks from URL as a person would: follows redirects, fills in each form (login name and
// password where asked; consent and device confirmation as they are) and submits it. Stops
// when `stopAt(href)` says so for a redirect target (returns that URL), or at the first page
// with no form (returns { url, status, body }).
export async function walk(start, { user, password = 'dev', stopAt = () => false } = {}) {
  let url = start;
  let res = await request(url);
  for (let step = 0; step < 30; step += 1) {
    if (res.status >= 300 && res.status < 400) {
      const location = res.headers.get('location');
      if (!location) throw new Error(`redirect without Location from ${url}`);
      const next = new URL(location, url);
      if (stopAt(next.href)) return next;
      url = next.href;
      res = await request(url);
      continue;
    }
    const body = await res.text();
    const form = res.status === 200 ? readForm(body, url) : undefined;
    if (!form) return { url, status: res.status, body };
    if (form.fields.has('login')) form.fields.set('login', user);
    if (form.fields.has('password')) form.fields.set('password', password);
    url = form.action;
    res = await request(url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: form.fields.toString(),
    });
  }
  throw new Error(`gave up after 30 pages at ${url}`);
}
