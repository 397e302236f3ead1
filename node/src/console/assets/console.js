// The approvers' inbox. Everything from the server is put into the page with textContent,
// never as markup: a statement containing HTML shows as text.
'use strict';

let csrf = '';
let latest = [];

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

function details(a) {
  const s = a.shown || {};
  const parts = [];
  for (const k of Object.keys(s)) {
    const v = s[k];
    if (v === '' || v === null || (Array.isArray(v) && v.length === 0)) continue;
    parts.push(k + ': ' + (typeof v === 'string' ? v : JSON.stringify(v)));
  }
  return parts.join('; ');
}

function render(list) {
  latest = list;
  const inbox = $('inbox');
  const keep = new Map();
  for (const li of inbox.children) keep.set(li.dataset.id, li);
  const seen = new Set();
  for (const a of list) {
    seen.add(a.id);
    let li = keep.get(a.id);
    if (!li) {
      li = $('request').content.firstElementChild.cloneNode(true);
      li.dataset.id = a.id;
      li.querySelector('form').addEventListener('submit', (e) => decide(e, a.id, li));
      inbox.appendChild(li);
    }
    const f = (name, text) => { li.querySelector('[data-f="' + name + '"]').textContent = text; };
    const r = a.requester || { subject: '?', groups: [] };
    f('protocol', a.protocol || '?');
    f('target', a.target || '?');
    f('action', a.action);
    f('requester', r.subject + (r.groups.length ? ' (groups: ' + r.groups.join(', ') + ')' : ''));
    f('rule', a.rule);
    f('reason', a.reason || '—');
    f('details', details(a) || '—');
    f('age', ago(a.created_at_ms));
    f('expires', until(a.expires_at_ms));
    const yes = a.votes.filter((v) => v.approve).length;
    const votes = a.votes.map((v) => v.approver + (v.approve ? ' approved' : ' denied') + (v.comment ? ': ' + v.comment : ''));
    f('approvals', yes + ' of ' + a.approvals_required + ' (group ' + a.approver_group + ')' + (votes.length ? ' — ' + votes.join('; ') : ''));
    f('id', a.id);
  }
  for (const [id, li] of keep) if (!seen.has(id)) li.remove();
  $('empty').hidden = list.length !== 0;
}

async function decide(e, id, li) {
  e.preventDefault();
  const approve = e.submitter ? e.submitter.value === 'true' : false;
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

async function logout() {
  await fetch('/auth/logout', { method: 'POST', headers: { 'x-csrf-token': csrf }, credentials: 'same-origin' });
  document.body.textContent = 'Logged out. ';
  const again = document.createElement('a');
  again.href = '/';
  again.textContent = 'Log in again';
  document.body.appendChild(again);
}

async function start() {
  const res = await fetch('/api/me', { credentials: 'same-origin' });
  if (!res.ok) { window.location.assign('/'); return; }
  const me = await res.json();
  csrf = me.csrf;
  $('who').textContent = me.subject;
  $('logout').addEventListener('click', logout);
  listen();
  // Ages and expiries move on between updates.
  setInterval(() => render(latest), 5000);
}

start();
