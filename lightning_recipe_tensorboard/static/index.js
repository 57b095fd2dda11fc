// The "Recipe" tab: lightning_recipe's checklist, runs side by side (runs x diagnostics).
// Plain ES module, no dependency; TensorBoard loads it in an iframe whose base URL is
// /data/plugin/recipe/, so './runs' is this plugin's JSON route.

const ICON = { error: '\u2716', warning: '\u26a0', skipped: '\u21b7', ok: '\u2714', pending: '\u2026', 'not-run': '\u2013' };
const LABEL = { error: 'error', warning: 'warning', skipped: 'skipped', ok: 'ok', pending: 'waiting', 'not-run': 'not run' };
const RANK = { error: 0, warning: 1, skipped: 2, ok: 3, pending: 4, 'not-run': 5 };
const MAX_SHOWN = 6;
const META = new Set(['check-skipped', 'internal-error']);

const state = { data: null, error: null, shown: null, expanded: new Set(), onlyProblems: false, timer: null, fetchedAt: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
  return `${(seconds / 86400).toFixed(1)} days ago`;
}

// A link into TensorBoard's own dashboards, opened in the top window (we live in an iframe).
function tbHref(link) {
  let base = '';
  try {
    const top = window.top.location;
    base = top.origin + top.pathname + top.search;
  } catch (e) {
    base = '../../../';
  }
  return `${base}#${link.plugin}&tagFilter=${encodeURIComponent(link.tag)}`;
}

function sparkline(series, status) {
  const pts = (series && series.points) || [];
  if (pts.length < 2) return null;
  const w = 120, h = 28, pad = 2;
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => (typeof p[1] === 'number' ? p[1] : NaN)).filter((v) => Number.isFinite(v));
  if (ys.length < 2) return null;
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
  const coords = pts.filter((p) => Number.isFinite(p[1])).map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
  const root = svg('svg', { class: `spark ${status}`, width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  const title = svg('title');
  const fmt = (v) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : Number(v.toPrecision(3)));
  title.textContent = `${series.tag}: ${fmt(ys[0])} \u2192 ${fmt(ys[ys.length - 1])} (min ${fmt(y0)}, max ${fmt(y1)}), steps ${x0}..${x1}`;
  root.appendChild(title);
  root.appendChild(svg('polyline', { points: coords.join(' '), fill: 'none' }));
  const last = coords[coords.length - 1].split(',');
  root.appendChild(svg('circle', { cx: last[0], cy: last[1], r: 2 }));
  return root;
}

function message(key, text, cls) {
  const open = state.expanded.has(key);
  return el('span', {
    class: `${cls} ${open ? 'open' : ''}`,
    title: open ? null : 'click to read all of it',
    onclick: (ev) => {
      if (state.expanded.has(key)) state.expanded.delete(key);
      else state.expanded.add(key);
      ev.currentTarget.classList.toggle('open');
    },
  }, text);
}

function cell(run, diag) {
  if (!diag) return el('td', { class: 'cell absent', 'data-run': run.run }, el('span', { class: 'muted' }, 'not in this run'));
  const status = diag.status;
  const head = el('div', { class: 'cell-head' },
    el('span', { class: `pill ${status}`, title: LABEL[status] }, `${ICON[status] || '?'} ${LABEL[status] || status}`),
    diag.key && status !== 'skipped' ? el('span', { class: 'key' }, diag.key) : null,
    sparkline(diag.sparkline, status));
  const body = [];
  const problems = (diag.findings || []).filter((f) => f.severity === 'error' || f.severity === 'warning');
  problems.sort((a, b) => (a.severity === b.severity ? 0 : a.severity === 'error' ? -1 : 1));
  problems.forEach((f, i) => {
    body.push(el('div', { class: `finding ${f.severity}` },
      el('span', { class: 'code' }, f.code),
      f.step !== null && f.step !== undefined ? el('span', { class: 'step' }, `step ${f.step}`) : null,
      message(`${run.run}|${diag.name}|${i}`, f.message, 'msg'),
      f.try ? el('div', { class: 'try' }, el('b', {}, 'Try: '), f.try) : null));
  });
  // info findings: a skip or an internal error says why the row is grey; the others are notes
  const infos = (diag.findings || []).filter((f) => f.severity === 'info');
  const notes = new Set(diag.notes || []);
  infos.sort((a, b) => Number(notes.has(b.code)) - Number(notes.has(a.code)));
  infos.forEach((f, i) => {
    const meta = META.has(f.code);
    body.push(el('div', { class: `finding info ${meta ? 'meta' : ''} ${notes.has(f.code) ? 'note' : ''}` },
      el('span', { class: 'code' }, f.code),
      message(`${run.run}|${diag.name}|info${i}`, meta && diag.reason ? diag.reason : f.message, 'msg')));
  });
  if (!infos.some((f) => META.has(f.code)) && diag.reason && status !== 'ok') {
    body.push(el('div', { class: 'reason' }, message(`${run.run}|${diag.name}|reason`, diag.reason, 'msg')));
  }
  const links = (diag.links || []).map((l) => el('a', { href: tbHref(l), target: '_top', title: `${l.plugin}: ${l.tag}` }, `${l.label} \u2197`));
  return el('td', { class: `cell ${status}`, 'data-run': run.run, 'data-status': status }, head, body, links.length ? el('div', { class: 'links' }, links) : null);
}

function runHeader(run) {
  const c = run.counts || {};
  const live = run.status === 'running';
  const stale = live && run.updated_age_s > 600;
  const status = live
    ? el('span', { class: `badge ${stale ? 'stale' : 'live'}` }, stale ? 'running? no update' : '\u25cf running')
    : el('span', { class: `badge ${run.status}` }, run.status);
  const problems = [];
  if (c.error) problems.push(el('span', { class: 'count error' }, plural(c.error, 'error')));
  if (c.warning) problems.push(el('span', { class: 'count warning' }, plural(c.warning, 'warning')));
  if (!c.error && !c.warning && run.diagnostics) problems.push(el('span', { class: 'count ok' }, 'no warning'));
  const updated = run.updated ? new Date(run.updated * 1000).toLocaleTimeString() : '';
  return el('th', { class: 'run' },
    el('div', { class: 'run-name', title: run.path }, run.run),
    el('div', { class: 'run-meta' }, status,
      run.global_step !== undefined ? el('span', {}, `step ${run.global_step}`) : null,
      run.epoch !== undefined ? el('span', {}, `epoch ${run.epoch}`) : null, problems),
    el('div', { class: 'run-updated' },
      live ? (stale ? `last written ${ago(run.updated_age_s)}: the process may have stopped` : `still training: showing what is written so far (${updated})`)
        : `report written ${updated}`),
    run.error ? el('div', { class: 'finding error' }, run.error) : null);
}

function worst(rows) {
  let best = null;
  for (const r of rows) if (r && (best === null || RANK[r.status] < RANK[best])) best = r.status;
  return best;
}

function table(runs, stages) {
  const order = [];
  const meta = {};
  for (const run of runs) {
    for (const d of run.diagnostics || []) {
      if (!meta[d.name]) {
        meta[d.name] = d;
        order.push(d.name);
      }
    }
  }
  const byRun = runs.map((run) => Object.fromEntries((run.diagnostics || []).map((d) => [d.name, d])));
  const head = el('thead', {}, el('tr', {}, el('th', { class: 'diag corner' }, 'Recipe step', el('div', { class: 'muted' }, 'diagnostic')), runs.map(runHeader)));
  const body = el('tbody');
  stages.forEach((stage, si) => {
    const names = order.filter((n) => meta[n].stage === stage.key);
    if (!names.length) return;
    const shownNames = names.filter((n) => !state.onlyProblems || byRun.some((m) => m[n] && RANK[m[n].status] <= RANK.warning));
    body.appendChild(el('tr', { class: 'stage' },
      el('th', { class: 'diag' }, el('span', { class: 'num' }, `${si + 1}`), stage.title, el('div', { class: 'habit' }, stage.habit)),
      byRun.map((m) => {
        const status = worst(names.map((n) => m[n]));
        const bad = names.filter((n) => m[n] && RANK[m[n].status] <= RANK.warning).length;
        return el('td', { class: `stage-sum ${status || ''}` },
          status ? el('span', { class: `pill ${status}` }, `${ICON[status]} ${bad ? plural(bad, 'problem') : LABEL[status]}`) : null);
      })));
    for (const name of shownNames) {
      const cells = byRun.map((m) => m[name]);
      // runs disagree when one warns, fails or skips where another does not (a run that has not
      // measured this yet, or does not run it, disagrees with nobody)
      const loud = new Set(cells.map((d) => (d && RANK[d.status] <= RANK.skipped ? d.status : 'quiet')));
      const differs = runs.length > 1 && loud.size > 1;
      const d = meta[name];
      body.appendChild(el('tr', { class: `diag-row ${differs ? 'differs' : ''}`, 'data-diagnostic': name },
        el('th', { class: 'diag' },
          el('div', { class: 'title' }, d.title, differs ? el('span', { class: 'differs-mark', title: 'the runs disagree here' }, '\u2260') : null),
          el('div', { class: 'what' }, d.what || d.name)),
        cells.map((c, i) => cell(runs[i], c))));
    }
  });
  return el('table', { class: 'grid' }, head, body);
}

function summary(runs) {
  const lines = runs.filter((r) => r.diagnostics).map((r) => {
    const codes = [];
    for (const d of r.diagnostics) {
      for (const f of d.findings || []) {
        if ((f.severity === 'error' || f.severity === 'warning') && !codes.some((c) => c.code === f.code)) codes.push(f);
      }
    }
    codes.sort((a, b) => (a.severity === b.severity ? 0 : a.severity === 'error' ? -1 : 1));
    return el('div', { class: 'summary-line' },
      el('span', { class: 'run-name' }, r.run),
      codes.length
        ? codes.map((f) => el('span', { class: `code ${f.severity}` }, f.code))
        : el('span', { class: 'code ok' }, 'every diagnostic quiet'));
  });
  return el('div', { class: 'summary' }, lines);
}

function picker(all) {
  if (all.length < 2) return null;
  return el('div', { class: 'picker' }, el('span', { class: 'muted' }, 'Runs:'),
    all.map((r) => el('label', {},
      el('input', {
        type: 'checkbox',
        checked: state.shown.has(r.run),
        onchange: (ev) => {
          if (ev.target.checked) state.shown.add(r.run);
          else state.shown.delete(r.run);
          draw();
        },
      }), r.run)));
}

function draw() {
  const root = document.getElementById('recipe-root');
  const data = state.data;
  const top = el('div', { class: 'top' },
    el('h1', {}, 'Recipe', el('span', { class: 'sub' }, ' checklist of every run: Karpathy\'s stages, each diagnostic measured, skipped or failed')),
    el('label', { class: 'toggle' }, el('input', {
      type: 'checkbox',
      checked: state.onlyProblems,
      onchange: (ev) => { state.onlyProblems = ev.target.checked; draw(); },
    }), 'only rows with a warning or error'),
    el('span', { class: 'muted refreshed' }, state.fetchedAt ? `updated ${state.fetchedAt.toLocaleTimeString()}` : ''));
  const parts = [top];
  if (state.error) parts.push(el('div', { class: 'banner error' }, `Could not read the runs: ${state.error}`));
  if (data && !data.runs.length) {
    parts.push(el('div', { class: 'banner' },
      `No lightning_recipe report under ${data.logdir || 'this log directory'} yet. Train with `,
      el('code', {}, 'callbacks=lightning_recipe.recipe_callbacks()'),
      ' and a TensorBoardLogger: each run writes recipe_report.json at fit start and this tab fills in while it trains.'));
  }
  if (data && data.runs.length) {
    const runs = data.runs.filter((r) => state.shown.has(r.run));
    parts.push(picker(data.runs));
    parts.push(summary(runs));
    parts.push(runs.length ? table(runs, data.stages) : el('div', { class: 'banner' }, 'Pick a run above.'));
  }
  root.replaceChildren(...parts.filter(Boolean));
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    const resp = await fetch('./runs', { cache: 'no-store' });
    if (!resp.ok) throw new Error(`${resp.status} ${resp.statusText}`);
    state.data = await resp.json();
    state.error = null;
    state.fetchedAt = new Date();
    if (state.shown === null) state.shown = new Set(state.data.runs.slice(0, MAX_SHOWN).map((r) => r.run));
    else for (const r of state.data.runs) if (!state.known || !state.known.has(r.run)) state.shown.add(r.run);
    state.known = new Set(state.data.runs.map((r) => r.run));
  } catch (e) {
    state.error = String(e.message || e);
  }
  draw();
  const live = state.data && state.data.runs.some((r) => r.status === 'running');
  state.timer = setTimeout(refresh, live ? 3000 : 15000);
}

export async function render() {
  const css = el('link', { rel: 'stylesheet', href: './style.css' });
  document.head.appendChild(css);
  document.body.appendChild(el('div', { id: 'recipe-root' }, el('div', { class: 'muted' }, 'Loading the recipe\u2026')));
  await refresh();
}
