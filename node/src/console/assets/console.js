// The console: the approvers' inbox and the auditors' sessions. Everything from the server is
// put into the page with textContent, never as markup: a statement containing HTML shows as
// text.
'use strict';

let csrf = '';
let latest = { requests: [], more: false };

function $(id) { return document.getElementById(id); }

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  return Math.floor(s / 3600) + ' h ago';
}

function until(ms) {
  const s = Math.round((ms - Date.now()) / 1000);
  if (s <= 0) return 'expired';
  const at = new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  return 'in ' + (s < 120 ? s + ' s' : Math.floor(s / 60) + ' min') + ' (' + at + ')';
}

// What the action's hash binds besides its text, in the words and order `vigil approvals show`
// prints it (the server sends every text escaped as the CLI escapes it).
function details(a) {
  const s = a.shown;
  if (!s) return a.summarized ? '' : '—';
  const lines = [];
  const line = (label, value) => lines.push(label.padEnd(12) + value);
  if (a.protocol === 'postgres') {
    line('mode', s.mode);
    for (const r of s.runs) line('runs', r.name + ' = ' + r.text);
    s.params.forEach((p, i) => line('param $' + (i + 1), (p.value === null ? 'NULL' : "'" + p.value + "'") + ' (' + p.format + ')'));
    line('database', s.database);
    line('role', s.role);
    line('search_path', s.search_path);
    if (s.settings) line('settings', s.settings);
  } else if (a.protocol === 'ssh') {
    line('login', s.login);
    line('request', s.request_type);
  } else if (a.protocol === 'kubernetes') {
    line('method', s.method);
    line('path', s.path);
    line('body', s.body);
    line('body sha256', s.body_sha256);
  }
  return lines.join('\n');
}

// The requests the list summarised (too large to list whole) that the approver asked for whole:
// id → the request as the coordinator answers it.
const whole = new Map();

function render(page) {
  latest = page;
  const list = page.requests;
  const inbox = $('inbox');
  const keep = new Map();
  for (const li of inbox.children) keep.set(li.dataset.id, li);
  const seen = new Set();
  for (const listed of list) {
    seen.add(listed.id);
    // The text and what it binds never change: once read whole, shown whole.
    const a = whole.get(listed.id) || listed;
    let li = keep.get(a.id);
    if (!li) {
      li = $('request').content.firstElementChild.cloneNode(true);
      li.dataset.id = a.id;
      // Only a click on Approve or Deny decides: Enter in the comment field submits nothing
      // (as the form's first button, Approve would be what an implicit submission sends).
      li.querySelector('form').addEventListener('submit', (e) => e.preventDefault());
      for (const b of li.querySelectorAll('form.decide button')) {
        b.addEventListener('click', () => decide(b.value === 'true', a.id, li));
      }
      li.querySelector('button.whole').addEventListener('click', () => readWhole(a.id, li));
      inbox.appendChild(li);
    }
    const f = (name, text) => { li.querySelector('[data-f="' + name + '"]').textContent = text; };
    const r = a.requester || { subject: '?', groups: [] };
    f('protocol', a.protocol || '?');
    f('target', a.target || '?');
    f('action', a.action);
    // Summarised: the beginning only, and no deciding until the whole request is on the page.
    li.querySelector('.summarized').hidden = !a.summarized;
    for (const b of li.querySelectorAll('form.decide button')) b.disabled = a.summarized;
    const by = listed.requested_by || a.requested_by || {};
    const model = [by.model, by.model_version].filter(Boolean).join(' ');
    // What the requester chose (its model, intent, groups' names) is quoted: none of it can
    // read as the page's own separators.
    const q = (s) => JSON.stringify(String(s));
    const who = [by.client_id && 'client ' + q(by.client_id), model && 'model ' + q(model), by.intent && 'intent ' + q(by.intent)].filter(Boolean);
    f('requester', q(r.subject) + (who.length ? ' (' + who.join(', ') + ')' : '') + (r.groups.length ? '; groups: ' + r.groups.map(q).join(', ') : ''));
    f('rule', a.rule);
    f('reason', a.reason || '—');
    f('details', details(a));
    f('age', ago(listed.created_at_ms));
    f('expires', until(listed.expires_at_ms));
    const yes = listed.votes.filter((v) => v.approve).length;
    const votes = listed.votes.map((v) => q(v.approver) + (v.approve ? ' approved' : ' denied') + (v.comment ? ': ' + q(v.comment) : ''));
    f('approvals', yes + ' of ' + listed.approvals_required + ' (group ' + listed.approver_group + ')' + (votes.length ? ' — ' + votes.join('; ') : ''));
    f('id', a.id);
  }
  for (const [id, li] of keep) if (!seen.has(id)) li.remove();
  for (const id of [...whole.keys()]) if (!seen.has(id)) whole.delete(id);
  $('empty').hidden = list.length !== 0;
  $('more').hidden = !page.more;
}

// A summarised request, whole (`GET /api/approvals/ID`), before anyone may decide on it.
async function readWhole(id, li) {
  const out = li.querySelector('.outcome');
  out.classList.remove('error');
  out.textContent = 'Loading the whole request…';
  const res = await fetch('/api/approvals/' + encodeURIComponent(id), { credentials: 'same-origin' });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    out.classList.add('error');
    out.textContent = 'Cannot load it: ' + (body.error || res.status);
    return;
  }
  out.textContent = '';
  whole.set(id, body);
  render(latest);
}

async function decide(approve, id, li) {
  const comment = li.querySelector('input[name="comment"]').value;
  const out = li.querySelector('.outcome');
  out.classList.remove('error');
  out.textContent = 'Sending…';
  const res = await fetch('/api/approvals/' + encodeURIComponent(id) + '/decision', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
    body: JSON.stringify({ approve, comment }),
    credentials: 'same-origin',
  });
  const body = await res.json().catch(() => ({}));
  if (res.ok) {
    out.textContent = (approve ? 'Approved' : 'Denied') + ': now ' + body.state;
  } else {
    out.classList.add('error');
    out.textContent = 'Refused: ' + (body.error || res.status);
  }
}

function listen() {
  const events = new EventSource('/api/approvals/events');
  events.addEventListener('approvals', (e) => {
    $('status').textContent = 'Live: updated ' + new Date().toLocaleTimeString();
    render(JSON.parse(e.data));
  });
  events.addEventListener('problem', (e) => { $('status').textContent = e.data; });
  events.onerror = async () => {
    const me = await fetch('/api/me', { credentials: 'same-origin' });
    if (me.status === 401) {
      events.close();
      $('status').textContent = 'Your login has ended.';
      window.location.assign('/');
    } else {
      $('status').textContent = 'Reconnecting…';
    }
  };
}

// "Logged out" only once the node says so: when the logout cannot be kept (the coordinator
// unreachable, a refusal), the login still holds and the page says that instead.
async function logout() {
  let res;
  try {
    res = await fetch('/auth/logout', { method: 'POST', headers: { 'x-csrf-token': csrf }, credentials: 'same-origin' });
  } catch (e) {
    $('status').textContent = 'Not logged out: the node cannot be reached. Your login still holds; try again.';
    return;
  }
  const answer = await res.json().catch(() => ({}));
  if (!res.ok || answer.logged_out !== true) {
    $('status').textContent = 'Not logged out: ' + (answer.error || res.status) + '. Your login still holds; try again.';
    return;
  }
  document.body.textContent = 'Logged out. ';
  const again = document.createElement('a');
  again.href = '/';
  again.textContent = 'Log in again';
  document.body.appendChild(again);
}

// ---- The auditors' pages ----

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function utc(time) {
  return (time || '').replace('T', ' ').replace(/\.\d+Z$/, '').replace(/Z$/, '');
}

let older = null;

function searchParams() {
  const form = $('search');
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) {
    if (v === '') continue;
    if (k === 'from' || k === 'to') {
      params.set(k + '_ms', String(Date.parse(v + 'Z')));
    } else {
      params.set(k, v);
    }
  }
  return params;
}

async function search(more) {
  const params = searchParams();
  if (more && older) {
    params.set('before_ms', String(older.started_ms));
    params.set('before', older.session);
  }
  $('found').textContent = 'Searching…';
  const res = await fetch('/api/sessions?' + params.toString(), { credentials: 'same-origin' });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) { $('found').textContent = 'Refused: ' + (body.error || res.status); return; }
  const tbody = $('sessions').querySelector('tbody');
  if (!more) tbody.textContent = '';
  for (const s of body.sessions) {
    const tr = document.createElement('tr');
    const cells = [
      utc(s.started),
      s.subject || '(not logged in)',
      [s.client_id, s.model].filter(Boolean).join(', ') || '—',
      s.protocol,
      s.target || '—',
      s.statements,
      s.blocked,
      s.held,
      s.outcome || '—',
    ];
    for (const c of cells) tr.appendChild(el('td', c));
    const open = el('a', s.session);
    open.href = '#session/' + encodeURIComponent(s.session);
    open.setAttribute('aria-label', 'Open session ' + s.session);
    const td = el('td');
    td.appendChild(open);
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  const shown = tbody.children.length;
  older = body.sessions.length ? body.sessions[body.sessions.length - 1] : null;
  $('older').hidden = body.sessions.length < 50;
  $('found').textContent = shown + ' session' + (shown === 1 ? '' : 's') + ' shown (' + Math.round(body.took_ms) + ' ms)';
}

// What a record's request says, on one line.
function requestText(q) {
  if (!q) return '';
  switch (q.protocol) {
    case 'postgres': return q.text;
    case 'ssh': return q.request_type + (q.command ? ': ' + q.command : '') + (q.path ? ' ' + q.path : '') + (q.forward ? ' ' + q.forward : '');
    case 'kubernetes': return q.method + ' ' + q.path + (q.command && q.command.length ? ' — ' + q.command.join(' ') : '');
    case 'console': return q.action + ' of session ' + q.session;
    default: return JSON.stringify(q);
  }
}

function rowsTable(r) {
  const wrap = el('div', null, 'scroll');
  const table = el('table', null, 'rows');
  const head = document.createElement('tr');
  for (const c of r.columns) { const th = el('th', c); th.scope = 'col'; head.appendChild(th); }
  const thead = document.createElement('thead');
  thead.appendChild(head);
  table.appendChild(thead);
  const tbody = document.createElement('tbody');
  for (const row of r.result) {
    const tr = document.createElement('tr');
    for (const v of row) tr.appendChild(el('td', v === null ? 'NULL' : v, v === null ? 'null' : ''));
    tbody.appendChild(tr);
  }
  table.appendChild(tbody);
  wrap.appendChild(table);
  return wrap;
}

function timelineItem(rec) {
  const li = el('li', null, 'rec ' + rec.kind);
  const head = el('p', null, 'rec-head');
  head.appendChild(el('span', utc(rec.time), 'time'));
  head.appendChild(el('span', rec.kind.replace('_', ' '), 'kind'));
  if (rec.stmt !== undefined) head.appendChild(el('span', '#' + rec.stmt, 'stmt'));
  if (rec.outcome) head.appendChild(el('span', rec.outcome, 'outcome ' + rec.outcome));
  li.appendChild(head);
  const text = requestText(rec.request);
  if (text) li.appendChild(el('pre', text, 'statement'));
  if (rec.policy && rec.kind !== 'response') li.appendChild(el('p', 'rule ' + rec.policy.rule + ' (policy ' + rec.policy.version + ')', 'rule'));
  if (rec.approval) li.appendChild(el('p', 'approval ' + rec.approval.id + (rec.approval.state ? ': ' + rec.approval.state : ''), 'approval'));
  const r = rec.response;
  if (r) {
    if (r.protocol === 'postgres') {
      li.appendChild(el('p', (r.tags || []).join(', ') + ' — ' + r.rows + ' row' + (r.rows === 1 ? '' : 's') + (r.truncated ? ' (first ones recorded)' : '')));
      if (r.columns && r.columns.length && r.result) li.appendChild(rowsTable(r));
      if (r.error) li.appendChild(el('p', r.error.code + ': ' + r.error.message, 'error'));
    } else if (r.protocol === 'ssh') {
      li.appendChild(el('p', (r.exit_status !== undefined ? 'exit ' + r.exit_status : 'no exit status') + ', ' + r.bytes_in + ' bytes in, ' + r.bytes_out + ' out'));
      if (r.error) li.appendChild(el('p', r.error.message, 'error'));
    } else if (r.protocol === 'kubernetes') {
      li.appendChild(el('p', 'HTTP ' + r.status + ', ' + r.bytes + ' bytes'));
      if (r.error) li.appendChild(el('p', r.error.reason + ': ' + r.error.message, 'error'));
      if (r.body) li.appendChild(el('pre', r.body, 'body'));
    }
  }
  if (rec.detail) li.appendChild(el('p', rec.detail, 'detail'));
  return li;
}

function summaryList(s) {
  const dl = $('s-summary');
  dl.textContent = '';
  const rows = [
    ['Principal', s.subject || '(not logged in)'],
    ['Client', s.client_id || '—'],
    ['Model', s.model || '—'],
    ['Declared intent', s.intent || '—'],
    ['Protocol', s.protocol],
    ['Target', s.target || '—'],
    ['From', s.client_addr || '—'],
    ['Node', s.node],
    ['Started (UTC)', utc(s.started)],
    ['Ended (UTC)', s.ended ? utc(s.ended) : 'not ended (yet)'],
    ['Requests', s.statements + ' (' + s.blocked + ' blocked, ' + s.held + ' held, ' + s.errors + ' failed)'],
  ];
  for (const [k, v] of rows) { dl.appendChild(el('dt', k)); dl.appendChild(el('dd', v)); }
}

async function showBadge(id) {
  const badge = $('badge');
  badge.className = 'badge';
  badge.textContent = 'Verifying…';
  const res = await fetch('/api/sessions/' + encodeURIComponent(id) + '/verification', { credentials: 'same-origin' });
  const b = await res.json().catch(() => ({}));
  if (!res.ok) { badge.classList.add('broken'); badge.textContent = 'Cannot verify: ' + (b.error || res.status); return; }
  if (b.state === 'verified') {
    badge.classList.add('verified');
    let text = 'Verified: every record of stream ' + b.stream + ' through seq ' + b.through_seq + ' is present, in order and unaltered';
    if (b.anchored && b.checkpoint) {
      text += '; anchored by the witnessed checkpoint at seq ' + b.checkpoint.seq + ' (' + new Date(b.checkpoint.time_ms).toISOString() + ')';
    } else {
      text += '; not yet anchored by a witnessed checkpoint' + (b.anchored_seq !== null && b.anchored_seq !== undefined ? ' (the last one covers seq ' + b.anchored_seq + ')' : '');
    }
    badge.textContent = text + '.';
  } else if (b.state === 'broken') {
    badge.classList.add('broken');
    let text = 'Chain broken at ' + b.failure.location + (b.failure.seq !== null ? ' (seq ' + b.failure.seq + ')' : '') + ': ' + b.failure.problem;
    for (const c of b.changed || []) {
      text += '. Altered since it was written: this session\'s record at seq ' + c.seq + ' (' + c.location + '); the page shows it as it was indexed';
    }
    badge.textContent = text + '.';
  } else {
    badge.classList.add('broken');
    badge.textContent = 'Cannot verify: ' + (b.detail || b.state);
  }
}

// A session named by the address the page was opened with (a link, perhaps on another site,
// which the SameSite=Lax cookie follows) is shown only once the person asks: opening it is a
// look on record, which another site must not be able to make in their name.
function offerSession(id) {
  $('s-id').textContent = id;
  $('timeline').textContent = '';
  $('s-summary').textContent = '';
  $('badge').textContent = '';
  $('s-offer').hidden = false;
  $('s-open').onclick = () => { $('s-offer').hidden = true; showSession(id); };
}

async function showSession(id) {
  $('s-offer').hidden = true;
  $('s-id').textContent = id;
  $('timeline').textContent = '';
  $('s-summary').textContent = '';
  $('s-download').href = '/api/sessions/' + encodeURIComponent(id) + '/records.jsonl';
  const res = await fetch('/api/sessions/' + encodeURIComponent(id), { credentials: 'same-origin' });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) { $('badge').textContent = 'Refused: ' + (body.error || res.status); return; }
  summaryList(body.session);
  let chunks = 0;
  const channels = new Set();
  for (const rec of body.records) {
    if (rec.kind === 'recording') {
      chunks += 1;
      if (rec.recording) channels.add(rec.recording.channel.replace(/\.resize$/, ''));
      continue;
    }
    $('timeline').appendChild(timelineItem(rec));
  }
  if (chunks) $('timeline').appendChild(el('li', chunks + ' recorded terminal or stream chunks: play them above', 'rec'));
  recordings(id, body.session.protocol, [...channels]);
  showBadge(id);
}

let player = null;

// A button per recorded channel (SSH) or exec (Kubernetes); the player plays the one chosen.
function recordings(id, protocol, channels) {
  const list = $('s-channels');
  list.textContent = '';
  $('player').textContent = '';
  if (player) { player.dispose(); player = null; }
  $('s-recordings').hidden = channels.length === 0;
  const noun = protocol === 'kubernetes' ? 'request' : 'channel';
  for (const c of channels) {
    const b = el('button', 'Play ' + noun + ' ' + c);
    b.type = 'button';
    b.className = 'play';
    b.addEventListener('click', () => play(id, c));
    list.appendChild(b);
  }
}

async function play(id, channel) {
  const url = '/api/sessions/' + encodeURIComponent(id) + '/asciicast/' + encodeURIComponent(channel);
  const res = await fetch(url, { credentials: 'same-origin' });
  const box = $('player');
  box.textContent = '';
  if (player) { player.dispose(); player = null; }
  if (!res.ok) {
    const b = await res.json().catch(() => ({}));
    box.appendChild(el('p', 'Cannot play: ' + (b.error || res.status), 'error'));
    return;
  }
  const cast = await res.text();
  player = AsciinemaPlayer.create({ data: cast }, box, { autoPlay: true, fit: 'width', idleTimeLimit: 2 });
}

// ---- Grants (admins) ----

function msUtc(ms) {
  return ms ? new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '') : '—';
}

async function grants() {
  const res = await fetch('/api/grants', { credentials: 'same-origin' });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) { $('grants-status').textContent = 'Refused: ' + (body.error || res.status); return; }
  const tbody = $('grants').querySelector('tbody');
  tbody.textContent = '';
  const now = Date.now();
  for (const g of body) {
    const tr = document.createElement('tr');
    tr.dataset.id = g.id;
    const state = g.revoked_at_ms ? 'revoked' : (g.not_after_ms <= now ? 'expired' : 'active');
    for (const c of [g.subject, g.issuer, g.protocol, g.target, g.access_class, msUtc(g.not_before_ms), msUtc(g.not_after_ms), g.granted_by, g.reason || '—', state]) {
      tr.appendChild(el('td', c));
    }
    const td = el('td');
    if (state === 'active') {
      const b = el('button', 'Revoke');
      b.type = 'button';
      b.className = 'revoke';
      b.setAttribute('aria-label', 'Revoke the grant of ' + g.subject + ' on ' + g.target);
      b.addEventListener('click', () => revoke(g.id));
      td.appendChild(b);
    }
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

async function change(url, body) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
    body: JSON.stringify(body),
    credentials: 'same-origin',
  });
  const answer = await res.json().catch(() => ({}));
  $('grants-status').textContent = res.ok ? 'Done.' : 'Refused: ' + (answer.error || res.status);
  grants();
}

async function createGrant(e) {
  e.preventDefault();
  const f = Object.fromEntries(new FormData($('grant-new')));
  f.minutes = Number(f.minutes);
  await change('/api/grants', f);
}

async function revoke(id) {
  await change('/api/grants/' + encodeURIComponent(id) + '/revoke', {});
}

// ---- Pages ----

let inboxStarted = false;

function route(event) {
  const hash = decodeURIComponent(window.location.hash.slice(1));
  const page = hash.startsWith('session/') ? 'session' : (['sessions', 'grants'].includes(hash) ? hash : 'approvals');
  for (const p of ['approvals', 'sessions', 'session', 'grants']) $('page-' + p).hidden = p !== page;
  if (page === 'grants') grants();
  if (page === 'approvals' && !inboxStarted) { inboxStarted = true; listen(); }
  if (page === 'sessions' && !$('sessions').querySelector('tbody').children.length) search(false);
  if (page === 'session') {
    const id = hash.slice('session/'.length);
    // `event` is the hashchange of a link in the page; without it, the page's first address.
    if (event) showSession(id); else offerSession(id);
  }
  const h = $('page-' + page).querySelector('h2');
  if (h) { h.tabIndex = -1; h.focus(); }
}

async function start() {
  const res = await fetch('/api/me', { credentials: 'same-origin' });
  if (!res.ok) { window.location.assign('/'); return; }
  const me = await res.json();
  csrf = me.csrf;
  $('who').textContent = me.subject;
  $('logout').addEventListener('click', logout);
  $('nav-sessions').hidden = !me.auditor;
  $('nav-grants').hidden = !me.admin;
  $('grant-new').addEventListener('submit', createGrant);
  // A grant names its subject with an identity provider: this person's, unless changed.
  $('grant-issuer').value = me.issuer;
  $('search').addEventListener('submit', (e) => { e.preventDefault(); search(false); });
  $('older').addEventListener('click', () => search(true));
  window.addEventListener('hashchange', route);
  route();
  // Ages and expiries move on between updates.
  setInterval(() => render(latest), 5000);
}

start();
