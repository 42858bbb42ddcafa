// The gatehouse admin UI: one ES module, no dependencies.
//
// It talks only to the JSON API of the server that served it, with the session cookie
// (same-origin fetch) and, on every change, the session's CSRF token in X-CSRF-Token.
// Data from the server reaches the page only as text (textContent, attributes set one
// by one): never as HTML.

const POLL_MS = 2000;
const AUDIT_ROWS = 100;

const session = { csrf: null, admin: null };
// Cleanups of the page on screen (timers), run when another page is shown.
let cleanups = [];
// The page on screen: a message belongs to it, and goes when another page is shown.
let currentPage = null;
// The bootstrap token a setup link brought: kept in memory only, and only while the
// setup page is on screen.
let setupToken = null;

// ---------------------------------------------------------------- small helpers

const $ = (id) => document.getElementById(id);

/** An element with attributes and children; strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'onclick') node.addEventListener('click', value);
    else if (name === 'className') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/**
 * A timestamp as a <time>, shown in UTC without the noise. The date and the clock time
 * each stay whole, so a narrow column breaks between them and nowhere else.
 */
function time(value) {
  if (!value) return el('span', { className: 'muted' }, '—');
  const shown = String(value).replace('T', ' ').replace(/(\.\d+)?Z$/, ' UTC');
  const [date, ...clock] = shown.split(' ');
  return el('time', { datetime: value },
    el('span', { className: 'nowrap' }, date), ' ', el('span', { className: 'nowrap' }, clock.join(' ')));
}

/**
 * Names each cell of `row` after its column's heading (`data-label`), which a narrow
 * screen shows beside the value once the table has become a list of cards. A column
 * whose heading is only for screen readers (the actions) gets no label.
 */
function labelCells(table, row) {
  const heads = table.tHead ? [...table.tHead.rows[0].cells] : [];
  [...row.cells].forEach((td, i) => {
    const head = heads[i];
    if (head && !td.hasAttribute('colspan') && !head.querySelector('.visually-hidden')) {
      td.dataset.label = head.textContent.trim();
    }
  });
  return row;
}

function fillRows(tbody, rows, columns, empty) {
  tbody.replaceChildren();
  if (rows.length === 0) {
    tbody.append(el('tr', {}, el('td', { colspan: columns, className: 'muted' }, empty)));
    return;
  }
  for (const row of rows) tbody.append(labelCells(tbody.parentElement, row));
}

function cell(...children) {
  return el('td', {}, ...children);
}

/** A cell whose kind (`id`, `actor`, `text`, `event`, `long`, `actions`) the style sheet sizes. */
function cellOf(kind, ...children) {
  return el('td', { className: kind }, ...children);
}

let statusTimer = null;
/**
 * A message in the polite live region, about the page on screen: it goes when another
 * page is shown, and an information after a few seconds; an error stays until then.
 */
function say(message, kind = 'info') {
  const box = $('status');
  clearTimeout(statusTimer);
  box.className = `status ${kind}`;
  box.textContent = message;
  if (kind === 'info') statusTimer = setTimeout(clearStatus, 6000);
}

function clearStatus() {
  clearTimeout(statusTimer);
  const box = $('status');
  box.textContent = '';
  box.className = 'status';
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * Calls the API. 401 signs the page out (except for the sign-in itself and calls made
 * with a `bearer` token, whose 401 means wrong credentials); 429 becomes "too many
 * attempts, wait N s".
 */
async function api(method, path, body, { signingIn = false, bearer = null } = {}) {
  const headers = { Accept: 'application/json' };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  else if (method !== 'GET' && session.csrf) headers['X-CSRF-Token'] = session.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
      redirect: 'error',
    });
  } catch {
    throw new ApiError(0, 'network', 'the server cannot be reached');
  }
  if (response.status === 204) return null;
  let data = null;
  const type = response.headers.get('content-type') || '';
  if (type.includes('application/json')) {
    try { data = await response.json(); } catch { data = null; }
  }
  if (response.ok) return data;
  const code = data && data.error ? String(data.error) : 'error';
  let message = data && data.message ? String(data.message) : `the request failed (${response.status})`;
  if (response.status === 429) {
    const wait = response.headers.get('retry-after');
    message = wait ? `Too many attempts, wait ${wait} s.` : 'Too many attempts, wait a moment.';
  }
  if (response.status === 401 && !signingIn && !bearer && path !== '/v1/session') {
    signedOut('Your session has ended: sign in again.');
  }
  throw new ApiError(response.status, code, message);
}

/** Runs `work`, and shows its failure (other than a 401, which shows the sign-in). */
async function guarded(work) {
  try {
    return await work();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return undefined;
    say(err.message || String(err), 'error');
    return undefined;
  }
}

/** Every device, following `next` page by page. */
async function allDevices() {
  const devices = [];
  let after = null;
  for (let i = 0; i < 500; i += 1) {
    const query = new URLSearchParams({ limit: '200' });
    if (after) query.set('after', after);
    const page = await api('GET', `/v1/devices?${query}`);
    devices.push(...page.devices);
    if (!page.next) break;
    after = page.next;
  }
  return devices;
}

/** The highest audit sequence number (0 for an empty log), by bisection. */
async function auditHead() {
  const exists = async (after) => {
    const page = await api('GET', `/v1/audit?after=${after}&limit=1`);
    return page.events.length > 0 ? page.events[0].seq : null;
  };
  const first = await exists(0);
  if (first === null) return 0;
  let lo = first; // an event with this seq exists
  let hi = lo;
  for (;;) {
    hi = Math.max(lo * 2, lo + 1024);
    const seen = await exists(hi);
    if (seen === null) break;
    lo = seen;
  }
  // lo exists; nothing above hi.
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    const seen = await exists(mid);
    if (seen === null) hi = mid;
    else lo = seen;
  }
  return lo;
}

/**
 * Audit events matching `type` after `after`, following `next` to the end of the log;
 * keeps the newest `keep`. Returns the events and the sequence number to poll after.
 */
async function auditTail(after, type, keep) {
  let events = [];
  let cursor = after;
  for (let i = 0; i < 200; i += 1) {
    const query = new URLSearchParams({ after: String(cursor), limit: '1000' });
    if (type) query.set('type', type);
    const page = await api('GET', `/v1/audit?${query}`);
    events.push(...page.events);
    if (events.length > keep) events = events.slice(events.length - keep);
    if (page.events.length > 0) cursor = Math.max(cursor, page.events[page.events.length - 1].seq);
    if (page.next === null || page.next === undefined) break;
    cursor = Math.max(cursor, page.next);
  }
  return { events, cursor };
}

// ---------------------------------------------------------------- sign-in and routing

function showPage(name) {
  if (name !== currentPage) clearStatus();
  currentPage = name;
  if (name !== 'setup') setupToken = null;
  for (const page of document.querySelectorAll('.page')) page.hidden = page.id !== `page-${name}`;
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.page === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function signedOut(message) {
  session.csrf = null;
  session.admin = null;
  stopPage();
  $('nav').hidden = true;
  $('who').hidden = true;
  showPage('signin');
  document.title = 'Sign in – gatehouse admin';
  if (message) say(message, 'error');
  $('signin-username').focus();
}

function signedIn(body) {
  session.csrf = body.csrf_token;
  session.admin = body.admin;
  const who = body.admin.method === 'password'
    ? `Signed in as ${body.admin.user}`
    : `Signed in with admin token ${body.admin.id}`;
  $('who-name').textContent = who;
  $('nav').hidden = false;
  $('who').hidden = false;
  route();
}

function stopPage() {
  for (const cleanup of cleanups) cleanup();
  cleanups = [];
}

function every(ms, work) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    try { await work(); } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) say(err.message || String(err), 'error');
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  cleanups.push(() => { stopped = true; clearTimeout(timer); });
}

const PAGES = {
  overview: { title: 'Overview', load: loadOverview },
  pairing: { title: 'Pairing', load: loadPairing },
  device: { title: 'Device codes', load: loadDeviceCode },
  devices: { title: 'Devices', load: loadDevices },
  audit: { title: 'Audit log', load: loadAudit },
  front: { title: 'Front door', load: loadFront },
  bans: { title: 'Bans', load: loadBans },
  keys: { title: 'Keys', load: loadKeys },
};

function route() {
  if (!session.csrf) return;
  stopPage();
  const name = location.hash.replace(/^#/, '');
  const page = Object.hasOwn(PAGES, name) ? name : 'overview';
  showPage(page);
  document.title = `${PAGES[page].title} – gatehouse admin`;
  const heading = document.querySelector(`#page-${page} h1`);
  if (heading && document.activeElement && document.activeElement.closest('#nav')) {
    heading.setAttribute('tabindex', '-1');
    heading.focus();
  }
  PAGES[page].load();
}

async function signIn(body, form) {
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  try {
    const answer = await api('POST', '/v1/session', body, { signingIn: true });
    form.reset();
    signedIn(answer);
    say('Signed in.');
  } catch (err) {
    const message = err.status === 401
      ? 'Sign-in refused: the credentials are wrong, or the token is revoked.'
      : err.message;
    say(message, 'error');
  } finally {
    button.disabled = false;
  }
}

async function signOut() {
  try {
    await api('DELETE', '/v1/session');
  } catch (err) {
    if (err.status !== 401) { say(err.message, 'error'); return; }
  }
  signedOut();
  say('Signed out.');
}

// ---------------------------------------------------------------- first admin user

// The setup link reads `/admin/#setup=<admin token>`: a fragment never reaches the
// server, so the token stays out of request lines and logs. The page takes it out of
// the address bar (and so out of the history) before anything else.
const SETUP_HASH = /^#setup(?:=(.*))?$/;

/** Shows the setup page if the address asks for it; true if it did. */
function setupFromAddress() {
  const match = location.hash.match(SETUP_HASH);
  if (!match) return false;
  let token = null;
  if (match[1]) {
    try { token = decodeURIComponent(match[1]).trim(); } catch { token = null; }
    history.replaceState(null, '', `${location.pathname}${location.search}#setup`);
  }
  showSetup(token || null);
  return true;
}

function showSetup(token) {
  stopPage();
  showPage('setup');
  setupToken = token;
  document.title = 'Create the first admin user – gatehouse admin';
  $('setup-existing').hidden = true;
  $('setup-token-field').hidden = Boolean(token);
  $('setup-token').required = !token;
  (token ? $('setup-username') : $('setup-token')).focus();
  if (token) checkSetupToken(token);
}

/**
 * Tries the link's token before a password is typed: a revoked or mistyped one is said
 * at once (and a field to paste another is shown); users made before are named.
 */
async function checkSetupToken(token) {
  try {
    const { users } = await api('GET', '/v1/admin-users', undefined, { bearer: token });
    if (setupToken !== token) return;
    const note = $('setup-existing');
    note.textContent = users.length > 0
      ? `Admin users exist already: ${users.map((u) => u.username).join(', ')}. Another can be made here, or sign in.`
      : '';
    note.hidden = users.length === 0;
  } catch (err) {
    if (setupToken !== token) return;
    setupToken = null;
    $('setup-token-field').hidden = false;
    $('setup-token').required = true;
    const message = err.status === 401
      ? 'The setup link’s token is not accepted: it is mistyped, or it was revoked. Paste an admin token, or sign in.'
      : err.message;
    say(message, 'error');
  }
}

async function createFirstUser(event) {
  event.preventDefault();
  const form = event.target;
  const token = setupToken || $('setup-token').value.trim();
  const username = $('setup-username').value.trim();
  const password = $('setup-password').value;
  if (!token) {
    say('Paste the bootstrap admin token first.', 'error');
    $('setup-token').focus();
    return;
  }
  if (password !== $('setup-password2').value) {
    say('The two passwords differ: type the same one twice.', 'error');
    $('setup-password2').focus();
    return;
  }
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  try {
    try {
      await api('POST', '/v1/admin-users', { username, password }, { bearer: token });
    } catch (err) {
      if (err.status === 401) {
        setupToken = null;
        $('setup-token-field').hidden = false;
        $('setup-token').required = true;
        say('The token is not accepted: it is mistyped, or it was revoked.', 'error');
      } else {
        say(`The user was not created: ${err.message.replace(/\.$/, '')}.`, 'error');
      }
      return;
    }
    setupToken = null;
    form.reset();
    history.replaceState(null, '', `${location.pathname}${location.search}`);
    try {
      const answer = await api('POST', '/v1/session', { username, password }, { signingIn: true });
      signedIn(answer);
      say(`Admin user ${username} created; signed in.`);
    } catch (err) {
      signedOut(`Admin user ${username} created, but signing in failed: ${err.message}`);
      $('signin-username').value = username;
    }
  } finally {
    button.disabled = false;
  }
}

async function leaveSetup() {
  setupToken = null;
  $('setup-form').reset();
  history.replaceState(null, '', `${location.pathname}${location.search}`);
  if (session.csrf) {
    route();
    return;
  }
  // A setup link opened in a browser that was signed in already.
  try {
    signedIn(await api('GET', '/v1/session'));
  } catch {
    signedOut();
  }
}

// ---------------------------------------------------------------- overview

function definition(list, term, ...value) {
  list.append(el('dt', {}, term), el('dd', {}, ...value));
}

async function loadOverview() {
  const warnings = [];
  const tls = $('ov-tls');
  const devicesBox = $('ov-devices');
  tls.replaceChildren();
  devicesBox.replaceChildren();

  let ready = null;
  try {
    ready = await fetch('/readyz', { credentials: 'same-origin', cache: 'no-store' })
      .then(async (r) => ({ ok: r.ok, body: await r.json().catch(() => null) }));
  } catch {
    ready = { ok: false, body: null };
  }
  if (ready.ok && ready.body) {
    const r = ready.body;
    definition(tls, 'Readiness', 'ready');
    definition(tls, 'TLS mode', r.tls);
    definition(tls, 'Data-file format', String(r.format_version));
    if (r.tls === 'off') warnings.push('TLS is off: the listener speaks plain HTTP.');
    if (r.certificate) {
      definition(tls, 'Certificate names', r.certificate.names.join(', '));
      definition(tls, 'Issuer', r.certificate.issuer);
      definition(tls, 'Expires', time(r.certificate.not_after));
      const left = Date.parse(r.certificate.not_after) - Date.now();
      if (Number.isFinite(left) && left < 14 * 86400 * 1000) {
        warnings.push(`The certificate expires soon (${r.certificate.not_after}).`);
      }
    }
    if (r.acme) {
      definition(tls, 'ACME state', r.acme.state);
      definition(tls, 'ACME failures in a row', String(r.acme.failures_in_row));
      if (r.acme.renew_at) definition(tls, 'Renewal due', time(r.acme.renew_at));
      if (r.acme.next_attempt) definition(tls, 'Next attempt', time(r.acme.next_attempt));
      if (r.acme.last_error) definition(tls, 'Last ACME error', r.acme.last_error);
      if (r.acme.ordering_node) definition(tls, 'Ordering node', r.acme.ordering_node);
      if (r.acme.state === 'retrying') {
        warnings.push(`Certificate renewal is failing: ${r.acme.last_error || 'see the server log'}.`);
      }
    }
  } else {
    const why = ready.body && ready.body.message ? ready.body.message : 'no answer';
    definition(tls, 'Readiness', `not ready: ${why}`);
    warnings.push(`The server is not ready: ${why}.`);
  }

  await guarded(async () => {
    const devices = await allDevices();
    const count = (status) => String(devices.filter((d) => d.status === status).length);
    definition(devicesBox, 'Active', count('active'));
    definition(devicesBox, 'Needs pairing', count('needs_pairing'));
    definition(devicesBox, 'Revoked', count('revoked'));
  });

  await guarded(async () => {
    const { keys } = await api('GET', '/v1/keys');
    if (!keys.some((k) => k.state === 'active')) warnings.push('No signing key is active.');
    fillRows($('ov-keys').tBodies[0], keys.map((k) => el('tr', {},
      cellOf('id', el('code', {}, k.kid)), cell(k.alg), cell(k.state), cell(time(k.created_at)))), 4, 'No keys.');
  });

  await guarded(async () => {
    const { jobs } = await api('GET', '/v1/jobs');
    for (const job of jobs) {
      if (job.last_outcome === 'failure') {
        warnings.push(`Job ${job.name} failed${job.failures > 1 ? ` ${job.failures} times in a row` : ''}: ${job.last_error || 'see the server log'}.`);
      }
    }
    fillRows($('ov-jobs').tBodies[0], jobs.map((job) => el('tr', {},
      cell(job.name),
      cell(el('code', {}, job.schedule)),
      cell(time(job.last_run)),
      cellOf('text', job.running ? 'running' : (job.last_outcome || '—'), job.last_error ? el('span', { className: 'help' }, ` ${job.last_error}`) : null),
      cell(time(job.next_run)))), 5, 'No jobs.');
  });

  // The server's own findings (the master key's place, the bootstrap token, backups);
  // the ones this page already works out above are not repeated.
  await guarded(async () => {
    const shownAbove = new Set(['tls_off', 'certificate_expiring', 'acme_failing', 'job_failing']);
    const { warnings: found } = await api('GET', '/v1/status');
    for (const w of found) if (!shownAbove.has(w.code)) warnings.push(w.message);
  });

  const box = $('overview-warnings');
  const list = $('overview-warning-list');
  list.replaceChildren(...warnings.map((w) => el('li', {}, w)));
  box.hidden = warnings.length === 0;
}

// ---------------------------------------------------------------- pairing

// The device the next session pairs again (set from the devices page), or null.
let pairAgainDevice = null;

function loadPairing() {
  // A session shown earlier is not resumed: its QR code is still valid, but its
  // countdown and watch stopped when the page was left.
  $('pairing-session').hidden = true;
  const again = pairAgainDevice;
  $('pairing-again').hidden = !again;
  if (again) {
    $('pairing-again-name').textContent = again.name;
    $('pairing-again-id').textContent = again.id;
    $('pairing-name').value = again.name;
  }
}

function pairAgain(device) {
  pairAgainDevice = device;
  if (location.hash === '#pairing') loadPairing();
  else location.hash = '#pairing';
}

function cancelPairAgain() {
  pairAgainDevice = null;
  $('pairing-name').value = '';
  loadPairing();
}

async function openPairing(event) {
  event.preventDefault();
  stopPage();
  const name = $('pairing-name').value.trim();
  const ttl = Number($('pairing-ttl').value);
  const body = { ttl_seconds: ttl };
  if (name) body.name = name;
  if (pairAgainDevice) body.device_id = pairAgainDevice.id;
  const button = event.target.querySelector('button[type=submit]');
  button.disabled = true;
  try {
    // Claims are watched from the log's end as it was before the session existed.
    const head = await auditHead();
    const openedAt = Date.now();
    const created = await api('POST', '/v1/pairing/sessions', body);
    // Left meanwhile: the session's watch and message would land on another page.
    if (currentPage !== 'pairing') return;
    showPairing(created, openedAt + ttl * 1000, head);
    say(pairAgainDevice ? `Pairing session opened for ${pairAgainDevice.name}.` : 'Pairing session opened.');
    pairAgainDevice = null;
    $('pairing-again').hidden = true;
  } catch (err) {
    if (err.status !== 401) say(err.message, 'error');
  } finally {
    button.disabled = false;
  }
}

function showPairing(created, deadline, head) {
  const box = $('pairing-session');
  box.hidden = false;
  const qr = $('pairing-qr');
  qr.src = `/v1/pairing/sessions/${encodeURIComponent(created.session_id)}/qr.svg`;
  qr.hidden = false;
  $('pairing-uri').value = created.pairing_uri;
  const result = $('pairing-result');
  result.textContent = 'Waiting for the app to claim it…';
  result.className = 'result';
  const countdown = $('pairing-countdown');

  let done = false;
  const tick = () => {
    const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
    const minutes = Math.floor(left / 60);
    const seconds = String(left % 60).padStart(2, '0');
    countdown.replaceChildren(`Expires in ${minutes}:${seconds} (at `, time(created.expires_at), ')');
    if (left === 0 && !done) {
      done = true;
      countdown.textContent = 'This pairing session has expired.';
      qr.hidden = true;
      result.textContent = 'Not claimed.';
      say('The pairing session expired.', 'error');
      stopPage();
    }
  };
  tick();
  const timer = setInterval(tick, 1000);
  cleanups.push(() => clearInterval(timer));

  let cursor = head;
  every(POLL_MS, async () => {
    if (done) return;
    const page = await api('GET', `/v1/audit?type=pairing.claimed&after=${cursor}`);
    for (const ev of page.events) {
      cursor = Math.max(cursor, ev.seq);
      if (ev.details && ev.details.session_id === created.session_id) {
        done = true;
        const d = ev.details;
        const who = `${d.name || 'a device'}${d.platform ? ` (${d.platform})` : ''}`;
        result.replaceChildren('Claimed by ', el('strong', {}, who),
          ev.device ? ' — device ' : '', ev.device ? el('code', {}, ev.device) : '');
        result.className = 'result ok';
        countdown.textContent = 'Paired.';
        qr.hidden = true;
        say(`Pairing session claimed by ${who}.`);
        stopPage();
        return;
      }
    }
    if (page.next !== null && page.next !== undefined) cursor = Math.max(cursor, page.next);
  });
}

async function copyUri() {
  const input = $('pairing-uri');
  try {
    await navigator.clipboard.writeText(input.value);
    say('Pairing URI copied.');
  } catch {
    input.select();
    say('Select the pairing URI and copy it.', 'error');
  }
}

// ---------------------------------------------------------------- devices

let deviceList = [];

async function loadDevices() {
  await guarded(async () => {
    deviceList = await allDevices();
    renderDevices();
  });
}

function renderDevices() {
  const needle = $('devices-search').value.trim().toLowerCase();
  const shown = needle
    ? deviceList.filter((d) => [d.name, d.platform, d.id, d.app_version, d.status]
      .some((v) => String(v).toLowerCase().includes(needle)))
    : deviceList;
  $('devices-count').textContent = `${shown.length} of ${deviceList.length} devices`;
  fillRows($('devices-table').tBodies[0], shown.map((d) => el('tr', {},
    cellOf('text', d.name),
    cellOf('text', d.platform),
    cellOf('text', d.app_version),
    cell(el('span', { className: `badge ${d.status}` }, d.status.replace('_', ' ')),
      d.revoked_at ? el('span', { className: 'help block' }, time(d.revoked_at)) : null,
      d.status_reason ? el('span', { className: 'help block' }, REASONS[d.status_reason] || d.status_reason) : null),
    cell(time(d.created_at)),
    cell(time(d.last_seen)),
    cellOf('id', el('code', {}, d.id)),
    cellOf('actions', d.status === 'revoked' ? null : el('span', { className: 'actions' },
      d.status === 'needs_pairing'
        ? el('button', { type: 'button', 'aria-label': `Pair ${d.name} again`, onclick: () => pairAgain(d) }, 'Pair again')
        : null,
      el('button', { type: 'button', className: 'danger', 'aria-label': `Revoke ${d.name}`, onclick: () => revokeDevice(d) }, 'Revoke'))))),
  8, needle ? 'No device matches.' : 'No device has paired yet.');
}

// Why a device needs pairing, in words (`status_reason`).
const REASONS = {
  refresh_token_reused: 'its refresh token was used twice',
  signed_out: 'the app signed out',
  refresh_expired: 'unused past the refresh lifetime',
  no_tokens: 'no tokens left',
};

async function revokeDevice(device) {
  if (!window.confirm(`Revoke “${device.name}” (${device.id})? Its tokens stop working at once.`)) return;
  await guarded(async () => {
    await api('DELETE', `/v1/devices/${encodeURIComponent(device.id)}`);
    say(`Device ${device.name} revoked.`);
    await loadDevices();
    $('devices-search').focus();
  });
}

// ---------------------------------------------------------------- audit

async function loadAudit() {
  const tbody = $('audit-table').tBodies[0];
  const type = $('audit-type').value.trim();
  tbody.replaceChildren();
  await guarded(async () => {
    const head = await auditHead();
    // Recent events: the newest matching ones among the last few thousand.
    const start = Math.max(0, head - (type ? 20000 : AUDIT_ROWS));
    const { events, cursor } = await auditTail(start, type, AUDIT_ROWS);
    let rows = events.slice().reverse();
    fillRows(tbody, rows.map(auditRow), 6, 'No events.');
    let after = Math.max(cursor, head);
    if (!$('audit-live').checked) return;
    every(POLL_MS, async () => {
      const query = new URLSearchParams({ after: String(after), limit: '1000' });
      if (type) query.set('type', type);
      const page = await api('GET', `/v1/audit?${query}`);
      if (page.events.length > 0) after = Math.max(after, page.events[page.events.length - 1].seq);
      if (page.next !== null && page.next !== undefined) after = Math.max(after, page.next);
      if (page.events.length === 0) return;
      if (rows.length === 0) tbody.replaceChildren();
      for (const ev of page.events) tbody.prepend(labelCells($('audit-table'), auditRow(ev)));
      rows = page.events.slice().reverse().concat(rows);
      while (tbody.rows.length > AUDIT_ROWS) tbody.deleteRow(-1);
      rows = rows.slice(0, AUDIT_ROWS);
    });
  });
}

function auditRow(ev) {
  const details = Object.entries(ev.details || {})
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ');
  // Severity and outcome go with the type, the source address with the actor: six
  // columns leave the details room enough at a laptop's width.
  return el('tr', { className: `sev-${ev.severity}` },
    cell(String(ev.seq)),
    cell(time(ev.time)),
    cellOf('event', el('code', {}, ev.type), el('span', { className: 'help block' }, `${ev.severity}, ${ev.outcome}`)),
    cellOf('actor', ev.actor, el('span', { className: 'help block' }, ev.source ? `from ${ev.source}` : 'no address')),
    cellOf('id', ev.device ? el('code', {}, ev.device) : '—'),
    cellOf('long', el('span', { className: 'details' }, details)));
}

// ---------------------------------------------------------------- front door

async function loadFront() {
  await guarded(renderFront);
  every(5000, renderFront);
}

async function renderFront() {
  const view = await api('GET', '/v1/front');
  $('front-off').hidden = view.enabled;
  fillRows($('front-routes').tBodies[0], view.routes.map((r) => el('tr', {},
    cellOf('id', el('code', {}, r.route)),
    cell(r.auth, r.rate ? el('span', { className: 'help block' }, `at most ${r.rate}`) : null),
    cellOf('id', el('code', {}, r.upstream)),
    cell(el('span', { className: `badge ${r.reachable ? 'active' : 'revoked'}` }, r.reachable ? 'reachable' : 'down'),
      r.error ? el('span', { className: 'help block' }, r.error) : null),
    cell(String(r.requests), r.upstream_errors ? el('span', { className: 'help block' }, `${r.upstream_errors} failed at the app`) : null),
    cell(String(r.sockets)))), 6, view.enabled ? 'No routes.' : 'No front door.');
  fillRows($('front-sockets').tBodies[0], view.sockets.map((s) => el('tr', {},
    cellOf('id', el('code', {}, s.device_id)),
    cell(String(s.open)),
    cellOf('actions', el('button', {
      type: 'button', className: 'danger', 'aria-label': `Revoke device ${s.device_id}`,
      onclick: () => revokeSocketHolder(s.device_id),
    }, 'Revoke device')))), 3, 'No relayed sockets.');
  return view;
}

async function revokeSocketHolder(id) {
  if (!window.confirm(`Revoke device ${id}? Its tokens stop working and its sockets close at once.`)) return;
  await guarded(async () => {
    await api('DELETE', `/v1/devices/${encodeURIComponent(id)}`);
    // The relays close within moments of the revocation; say so once they have.
    let open = true;
    for (let tries = 0; tries < 10 && open; tries += 1) {
      const view = await renderFront();
      open = view.sockets.some((s) => s.device_id === id);
      if (open) await new Promise((done) => setTimeout(done, 200));
    }
    say(open
      ? `Device ${id} revoked; its sockets are still closing.`
      : `Device ${id} revoked; its sockets are closed.`);
    $('front-refresh').focus();
  });
}

// ---------------------------------------------------------------- bans

async function loadBans() {
  await guarded(async () => {
    const { bans } = await api('GET', '/v1/ratelimit/bans');
    fillRows($('bans-table').tBodies[0], bans.map((b) => el('tr', {},
      cellOf('id', el('code', {}, b.key)),
      cellOf('text', b.reason),
      cell(time(b.since)),
      cell(time(b.until), b.active ? el('span', {}, ` (${b.remaining_seconds} s left)`) : null),
      cell(String(b.offences)),
      cell(b.active ? 'yes' : 'no'),
      cellOf('actions', b.active
        ? el('button', { type: 'button', 'aria-label': `Unban ${b.key}`, onclick: () => liftBan(b.key) }, 'Unban')
        : null))), 7, 'No bans.');
  });
}

async function liftBan(key) {
  await guarded(async () => {
    await api('DELETE', `/v1/ratelimit/bans/${encodeURIComponent(key)}`);
    say(`Ban on ${key} lifted.`);
    await loadBans();
    $('bans-refresh').focus();
  });
}

// ---------------------------------------------------------------- keys

async function loadKeys() {
  await guarded(async () => {
    const { keys } = await api('GET', '/v1/keys');
    fillRows($('keys-table').tBodies[0], keys.map((k) => el('tr', {},
      cellOf('id', el('code', {}, k.kid)),
      cell(k.alg),
      cell(el('span', { className: `badge ${k.state}` }, k.state)),
      cell(time(k.created_at)),
      cell(time(k.activated_at)),
      cell(time(k.retiring_at)),
      cell(time(k.revoked_at)),
      cell(time(k.verify_until)))), 8, 'No keys.');
  });
}

async function rotateKeys() {
  if (!window.confirm('Rotate the signing keys now? The next key becomes active at once.')) return;
  await guarded(async () => {
    const report = await api('POST', '/v1/keys/rotate', { now: true });
    say(`Rotated: ${report.activated} is active${report.retiring ? `, ${report.retiring} is retiring` : ''}; the new next key is ${report.next}.`);
    await loadKeys();
  });
}

// ---------------------------------------------------------------- device codes

// A user code that arrived in the address (`/admin/device?user_code=…`, the device
// grant's verification_uri_complete), to fill in once signed in; it approves nothing.
let arrivedUserCode = null;

/** Moves `/admin/device?user_code=X` to `/admin/#device`, keeping the code for the form. */
function deviceFromAddress() {
  if (!/\/device$/.test(location.pathname)) return;
  const code = new URLSearchParams(location.search).get('user_code');
  if (code) arrivedUserCode = code.slice(0, 32);
  history.replaceState(null, '', `${location.pathname.replace(/device$/, '')}#device`);
}

function loadDeviceCode() {
  $('device-grant').hidden = true;
  if (arrivedUserCode) {
    $('device-code').value = arrivedUserCode;
    arrivedUserCode = null;
    lookUpDeviceCode();
  }
}

async function lookUpDeviceCode(event) {
  if (event) event.preventDefault();
  const code = $('device-code').value.trim();
  if (!code) {
    say('Type the code the device shows.', 'error');
    return;
  }
  try {
    const grant = await api('POST', '/v1/device_grants/lookup', { user_code: code });
    if (currentPage !== 'device') return;
    showGrant(grant);
  } catch (err) {
    $('device-grant').hidden = true;
    if (err.status !== 401) say(err.message, 'error');
  }
}

const GRANT_STATUS = {
  pending: 'Waiting for your decision',
  approved: 'Approved; the device has not taken its tokens yet',
  issued: 'Approved, and the device took its tokens',
  denied: 'Denied',
  expired: 'Expired before anyone decided',
};

function showGrant(grant) {
  const facts = $('device-grant-facts');
  facts.replaceChildren();
  definition(facts, 'Status', GRANT_STATUS[grant.status] || grant.status);
  definition(facts, 'Calls itself', grant.client_id || el('span', { className: 'muted' }, 'nothing'));
  definition(facts, 'Asked from', grant.requested_from);
  definition(facts, 'Asked at', time(grant.created_at));
  definition(facts, 'Code expires', time(grant.expires_at));
  if (grant.device_id) definition(facts, 'Device', `${grant.device_name || ''} (${grant.device_id})`);
  const open = grant.status === 'pending';
  $('device-decide').hidden = !open;
  if (open) $('device-name').value = grant.client_id || '';
  $('device-grant').hidden = false;
}

async function decideDeviceCode(approve) {
  const body = { user_code: $('device-code').value.trim() };
  const name = $('device-name').value.trim();
  if (approve && name) body.name = name;
  const buttons = [$('device-approve'), $('device-deny')];
  for (const b of buttons) b.disabled = true;
  try {
    const grant = await api('POST', approve ? '/v1/device_grants/approve' : '/v1/device_grants/deny', body);
    if (currentPage !== 'device') return;
    showGrant(grant);
    say(approve
      ? `Approved: ${grant.device_name} is a device now, and gets its tokens at its next poll.`
      : 'Denied: the device is told so at its next poll.');
  } catch (err) {
    if (err.status !== 401) say(err.message, 'error');
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// ---------------------------------------------------------------- start

function wire() {
  $('signin-password').addEventListener('submit', (event) => {
    event.preventDefault();
    signIn({ username: $('signin-username').value, password: $('signin-pass').value }, event.target);
  });
  $('signin-token').addEventListener('submit', (event) => {
    event.preventDefault();
    signIn({ token: $('signin-token-value').value.trim() }, event.target);
  });
  $('sign-out').addEventListener('click', signOut);
  $('signin-setup').addEventListener('click', () => { location.hash = 'setup'; });
  $('setup-form').addEventListener('submit', createFirstUser);
  $('setup-cancel').addEventListener('click', leaveSetup);
  $('overview-refresh').addEventListener('click', () => { loadOverview(); say('Refreshed.'); });
  $('pairing-form').addEventListener('submit', openPairing);
  $('pairing-again-cancel').addEventListener('click', cancelPairAgain);
  $('pairing-copy').addEventListener('click', copyUri);
  $('device-form').addEventListener('submit', lookUpDeviceCode);
  $('device-approve').addEventListener('click', () => decideDeviceCode(true));
  $('device-deny').addEventListener('click', () => decideDeviceCode(false));
  $('devices-search').addEventListener('input', renderDevices);
  $('audit-form').addEventListener('submit', (event) => { event.preventDefault(); stopPage(); loadAudit(); });
  $('audit-live').addEventListener('change', () => { stopPage(); loadAudit(); });
  $('front-refresh').addEventListener('click', () => guarded(renderFront));
  $('bans-refresh').addEventListener('click', loadBans);
  $('keys-rotate').addEventListener('click', rotateKeys);
  window.addEventListener('hashchange', () => {
    if (setupFromAddress()) return;
    if (session.csrf) route();
    else if (currentPage === 'setup') signedOut();
  });
}

async function start() {
  wire();
  deviceFromAddress();
  if (setupFromAddress()) return;
  try {
    const current = await api('GET', '/v1/session');
    signedIn(current);
  } catch (err) {
    signedOut(err.status === 401 ? null : err.message);
  }
}

start();
