// Drives the Plexus dashboard in headless Chromium (Debian's `chromium`, through
// playwright-core) against a running `plexus demo`, and checks what SPEC §7 promises.
//
// Run by crates/cli/tests/dashboard.rs, which starts the demo and passes, in the environment:
//   PLEXUS_DASHBOARD   the control plane's HTTP address (http://127.0.0.1:PORT)
//   PLEXUS_INGRESS     the ingress gateway (http://127.0.0.1:PORT)
//   PLEXUS_BIN         the plexus binary (for `plexus apply` / `plexus delete`)
//   PLEXUS_DATA_DIR    the demo's data dir (the CLI reads the admin token there)
//   PLEXUS_EXAMPLES    examples/bookinfo
//   SCREENSHOTS        where screenshots go
//   CHROMIUM           the browser (default /usr/bin/chromium)
// Prints one `ok`/`not ok` line per check and `N passed, N failed` at the end; exits 1 when
// anything failed.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync, mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { syntheticGraph } from './synthetic.mjs';

const BASE = required('PLEXUS_DASHBOARD');
const INGRESS = required('PLEXUS_INGRESS');
const PLEXUS = required('PLEXUS_BIN');
const DATA_DIR = required('PLEXUS_DATA_DIR');
const EXAMPLES = required('PLEXUS_EXAMPLES');
const SHOTS = required('SCREENSHOTS');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const PAGES = ['/', '/topology', '/services', '/workloads', '/routes', '/policies', '/tap', '/certificates', '/performance'];
const BOOKINFO = ['productpage', 'details', 'reviews', 'ratings'];
/** SPEC §7: data-service elements within 5 s of loading. */
const FIRST_PAINT_MS = 5000;
/** The brief: a change shows within 5 s without a reload. */
const LIVE_MS = 5000;

function required(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`check.mjs: ${name} is not set`);
    process.exit(2);
  }
  return v;
}

mkdirSync(SHOTS, { recursive: true });
const scratch = mkdtempSync(join(tmpdir(), 'plexus-dashboard-'));

let passed = 0;
let failed = 0;
async function check(name, fn) {
  const started = Date.now();
  try {
    const note = await fn();
    passed += 1;
    console.log(`ok - ${name} (${Date.now() - started} ms)${note ? `: ${note}` : ''}`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${name} (${Date.now() - started} ms)`);
    for (const line of String((e && e.stack) || e).split('\n').slice(0, 12)) console.log(`    ${line}`);
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(path) {
  const r = await fetch(BASE + path);
  assert(r.ok, `GET ${path}: ${r.status}`);
  return r.json();
}

function cli(...args) {
  return execFileSync(PLEXUS, args, {
    env: { ...process.env, PLEXUS_SERVER: BASE, PLEXUS_DATA_DIR: DATA_DIR },
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 30000,
  });
}

/** GETs /productpage through the ingress `n` times; returns how many answered 200. */
async function drive(n) {
  let ok = 0;
  for (let i = 0; i < n; i++) {
    try {
      const r = await fetch(`${INGRESS}/productpage`, { signal: AbortSignal.timeout(10000) });
      await r.arrayBuffer();
      if (r.status === 200) ok += 1;
    } catch (e) {
      // counted as not ok
    }
  }
  return ok;
}

/**
 * Watches a page for console errors, uncaught exceptions and requests to any host but
 * 127.0.0.1. `take()` returns and clears what was seen.
 */
function watch(page) {
  const seen = [];
  page.on('console', (m) => {
    if (m.type() === 'error') seen.push(`console error: ${m.text()} at ${m.location().url || '?'}`);
  });
  page.on('pageerror', (e) => seen.push(`uncaught: ${e.message}`));
  page.on('request', (r) => {
    const url = new URL(r.url());
    if (['data:', 'blob:', 'about:'].includes(url.protocol)) return;
    if (url.hostname !== '127.0.0.1') seen.push(`request off 127.0.0.1: ${r.method()} ${r.url()}`);
  });
  return { take: () => seen.splice(0, seen.length) };
}

/** Waits for the page's first successful refresh (the top bar says "updated HH:MM:SS"). The
 * whole suite runs beside it on two cores, where a debug control plane and Chromium have taken
 * more than 15 s for a page's first refresh (CI, once): 30 s. A page whose first refresh has
 * not come by then is reloaded once, said in the output, and given 30 s more (CI, once on a
 * slower machine: /topology's at 400 px stalled past 30 s after loading in 6 s in step 1): a
 * page that never refreshes still fails, a stall under the suite's load is logged and passes. */
async function loaded(page) {
  const updated = () => /^updated /.test(document.getElementById('live')?.textContent || '');
  try {
    await page.waitForFunction(updated, null, { timeout: 30000 });
  } catch (e) {
    console.log(`# ${page.url()}: no refresh within 30 s (${e.message.split('\n')[0]}); reloading once`);
    await page.reload();
    await page.waitForFunction(updated, null, { timeout: 30000 });
  }
}

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

function nameOf(path) {
  return path === '/' ? 'overview' : path.slice(1);
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
});

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });

  // 1. Every page loads, with no console error and no request off 127.0.0.1; a screenshot each.
  const tapAvailable = (await fetch(`${BASE}/api/v1/tap?target=all&max=1`, { signal: AbortSignal.timeout(15000) }).then((r) => r.status, () => 0)) === 200;
  for (const path of PAGES) {
    await check(`page ${path} loads with no console error and no request off 127.0.0.1`, async () => {
      const page = await context.newPage();
      const w = watch(page);
      const response = await page.goto(BASE + path);
      assert(response && response.status() === 200, `status ${response && response.status()}`);
      await loaded(page);
      assert(await page.locator(`section.page[data-page="${path}"]`).count() === 1, 'the page section is missing');
      // Let two more refreshes happen: errors from polling count too.
      await sleep(4500);
      assert(await page.locator('#banner').isHidden(), `banner shown: ${await page.locator('#banner').textContent()}`);
      assert((await page.title()).endsWith('· Plexus'), `title ${await page.title()}`);
      if (path === '/') assert(await page.locator('[data-card=proxies] .value').textContent() !== '0', 'no proxies on the overview');
      if (path === '/certificates') assert(await page.locator('[data-cert=trust-anchor]').count() === 1, 'no trust anchor shown');
      if (path === '/workloads') assert(await page.locator('[data-workload^="productpage-"]').count() >= 1, 'no productpage workload row');
      if (path === '/tap' && tapAvailable) {
        await page.locator('[data-tap-row]').first().waitFor({ timeout: 10000 });
      }
      await shot(page, nameOf(path));
      const problems = w.take();
      assert(!problems.length, problems.join('\n'));
      await page.close();
    });
  }

  // 2. The topology and services pages show the Bookinfo services within 5 s, untouched.
  for (const path of ['/topology', '/services']) {
    await check(`${path} shows ${BOOKINFO.join(', ')} within 5 s`, async () => {
      const page = await context.newPage();
      const w = watch(page);
      const started = Date.now();
      await page.goto(BASE + path);
      for (const name of BOOKINFO) {
        await page.locator(`[data-service="${name}"]`).first().waitFor({ timeout: Math.max(1, FIRST_PAINT_MS - (Date.now() - started)) });
      }
      const took = Date.now() - started;
      const problems = w.take();
      assert(!problems.length, problems.join('\n'));
      await page.close();
      return `all four after ${took} ms`;
    });
  }

  // 3. Edge numbers on the topology match /api/v1/graph within 10%.
  const topo = await context.newPage();
  const topoWatch = watch(topo);
  await topo.goto(`${BASE}/topology`);
  await loaded(topo);
  await check('topology edge numbers match /api/v1/graph within 10%', async () => {
    let last = '';
    for (let attempt = 0; attempt < 6; attempt++) {
      const shown = await topo.$$eval('g.edge[data-edge]', (els) => els.map((el) => {
        const key = el.getAttribute('data-edge');
        const label = document.querySelector(`g.edge-label[data-edge="${CSS.escape(key)}"]`);
        return {
          key,
          rps: Number(el.getAttribute('data-rps')),
          success: Number(el.getAttribute('data-success')),
          mtls: Number(el.getAttribute('data-mtls')),
          p99: el.getAttribute('data-p99') === '' ? null : Number(el.getAttribute('data-p99')),
          text: label ? [...label.querySelectorAll('text')].map((t) => t.textContent).join(' | ') : '',
        };
      }));
      const graph = await api('/api/v1/graph?window=1m&group=version');
      const problems = [];
      const byKey = new Map(shown.map((e) => [e.key, e]));
      const near = (a, b) => Math.abs(a - b) <= 0.1 * Math.max(Math.abs(a), Math.abs(b)) + 1e-9;
      for (const e of graph.edges) {
        const key = `${e.source}->${e.target}`;
        const s = byKey.get(key);
        if (!s) {
          problems.push(`edge ${key} is not shown`);
          continue;
        }
        // The label's numbers, as a person reads them: "4.83 rps · 100%", "p99 31.6 ms · mTLS 100%".
        const m = /^([\d.,]+) rps · ([\d.]+)% \| p99 (?:([\d.]+) (ms|s)|—) · mTLS ([\d.]+)%$/.exec(s.text);
        if (!m) {
          problems.push(`edge ${key}: unreadable label ${JSON.stringify(s.text)}`);
          continue;
        }
        const labelRps = Number(m[1].replace(/,/g, ''));
        const labelP99 = m[3] ? Number(m[3]) * (m[4] === 's' ? 1000 : 1) : null;
        if (!near(s.rps, e.requestsPerSecond)) problems.push(`${key}: data-rps ${s.rps} vs API ${e.requestsPerSecond}`);
        if (!near(labelRps, e.requestsPerSecond)) problems.push(`${key}: label rps ${labelRps} vs API ${e.requestsPerSecond}`);
        if (!near(s.success, e.successRate) || !near(Number(m[2]) / 100, e.successRate)) problems.push(`${key}: success ${s.success} / ${m[2]}% vs API ${e.successRate}`);
        if (!near(s.mtls, e.mtlsShare) || !near(Number(m[5]) / 100, e.mtlsShare)) problems.push(`${key}: mTLS ${s.mtls} / ${m[5]}% vs API ${e.mtlsShare}`);
        if ((e.p99Ms ?? null) !== null && (!near(s.p99, e.p99Ms) || !near(labelP99, e.p99Ms))) problems.push(`${key}: p99 ${s.p99} / ${labelP99} vs API ${e.p99Ms}`);
      }
      for (const s of shown) {
        if (!graph.edges.some((e) => `${e.source}->${e.target}` === s.key)) problems.push(`edge ${s.key} is shown but not in the API`);
      }
      if (graph.edges.length < 6) problems.push(`only ${graph.edges.length} edges in the API: Bookinfo has at least 6 hops`);
      if (!problems.length) return `${graph.edges.length} edges agree`;
      last = problems.join('\n');
      // The page polls every 2 s: a new window may have landed between the two reads.
      await sleep(1000);
    }
    throw new Error(last);
  });

  // 4. Live: new traffic shows within 5 s, without a reload.
  await check('topology updates within 5 s of new traffic, without a reload', async () => {
    await topo.evaluate(() => { window.__notReloaded = true; });
    // Over ten minutes (the demo is younger than that) nothing leaves the window: the counts
    // only grow, so the new pages must all show.
    await topo.locator('button[data-value="10m"]').click();
    await topo.waitForFunction(() => document.querySelector('svg.topology')?.getAttribute('data-window') === '10m', null, { timeout: 5000 });
    const ingress = await topo.$$eval('g.node[data-kind=ingress]', (els) => els.map((el) => el.getAttribute('data-node-id')));
    assert(ingress.length >= 1, 'no ingress node');
    const key = await topo.$$eval('g.edge[data-edge]', (els, ids) => {
      const e = els.find((el) => ids.includes(el.getAttribute('data-source')) && /productpage/.test(el.getAttribute('data-target')));
      return e ? e.getAttribute('data-edge') : null;
    }, ingress);
    assert(key, 'no ingress -> productpage edge');
    const requests = () => topo.$eval(`g.edge[data-edge="${key}"]`, (el) => Number(el.getAttribute('data-requests')));
    const before = await requests();
    const sent = 40;
    const ok = await drive(sent);
    assert(ok >= sent * 0.8, `only ${ok} of ${sent} pages answered 200`);
    const driven = Date.now();
    const want = before + ok;
    let now = before;
    while (Date.now() - driven < LIVE_MS) {
      now = await requests();
      if (now >= want) break;
      await sleep(100);
    }
    const took = Date.now() - driven;
    assert(now >= want, `edge ${key}: ${before} requests before, ${now} ${LIVE_MS} ms after ${ok} more pages (wanted ${want})`);
    assert(await topo.evaluate(() => window.__notReloaded === true), 'the page was reloaded');
    await shot(topo, 'topology-live');
    await topo.locator('button[data-value="1m"]').click();
    return `${key}: ${before} -> ${now} requests, shown ${took} ms after the traffic`;
  });

  await check('topology grouping per service and node selection', async () => {
    await topo.locator('button[data-value=service]').click();
    await topo.waitForFunction(() => document.querySelector('svg.topology')?.getAttribute('data-group') === 'service', null, { timeout: 5000 });
    assert(await topo.locator('g.node[data-service=reviews]').count() === 1, 'reviews should be one node per service');
    await topo.locator('g.node[data-service=reviews]').click();
    await topo.locator('.node-detail').waitFor({ timeout: 3000 });
    await shot(topo, 'topology-per-service');
    await topo.locator('button[data-value=version]').click();
    await topo.waitForFunction(() => document.querySelector('svg.topology')?.getAttribute('data-group') === 'version', null, { timeout: 5000 });
    assert(await topo.locator('g.node[data-service=reviews]').count() === 3, 'reviews should have three versions');
    const problems = topoWatch.take();
    assert(!problems.length, problems.join('\n'));
  });
  await topo.close();

  // Services: a row's charts from /api/v1/stat/series.
  await check('services page charts a selected service', async () => {
    const page = await context.newPage();
    const w = watch(page);
    await page.goto(`${BASE}/services`);
    await loaded(page);
    await page.locator('tr[data-service=productpage]').click();
    await page.locator('[data-charts=productpage] svg.chart').nth(2).waitFor({ timeout: 8000 });
    assert(await page.locator('tr[data-service=productpage] svg.spark path.line').count() === 1, 'no sparkline on the productpage row');
    await shot(page, 'services-selected');
    const problems = w.take();
    assert(!problems.length, problems.join('\n'));
    await page.close();
  });

  // 5. A route applied with the CLI appears on /routes without a reload; findings show.
  await check('a route applied with plexus apply appears on /routes, with its findings', async () => {
    try { cli('delete', 'httproute', 'reviews'); } catch (e) { /* not there: fine */ }
    const page = await context.newPage();
    const w = watch(page);
    await page.goto(`${BASE}/routes`);
    await loaded(page);
    await page.evaluate(() => { window.__notReloaded = true; });
    assert(await page.locator('[data-route="default/reviews"]').count() === 0, 'the route is there before it was applied');
    cli('apply', '-f', join(EXAMPLES, 'route-all-v1.yaml'));
    const applied = Date.now();
    await page.locator('[data-route="default/reviews"]').waitFor({ timeout: LIVE_MS });
    const took = Date.now() - applied;
    await page.locator('[data-route="default/reviews"] [data-backend="reviews-v1:9080"]').waitFor({ timeout: 1000 });
    // A route to a Service that does not exist: `check` reports it on the route's card.
    const broken = join(scratch, 'broken-route.yaml');
    writeFileSync(broken, [
      'apiVersion: gateway.networking.k8s.io/v1', 'kind: HTTPRoute', 'metadata: {name: details-broken}',
      'spec:', '  parentRefs: [{kind: Service, name: details, port: 9080}]',
      '  rules:', '  - matches: [{path: {type: PathPrefix, value: /nowhere}}]', '    backendRefs: [{name: details-v9, port: 9080}]', '',
    ].join('\n'));
    cli('apply', '-f', broken);
    await page.locator('[data-route="default/details-broken"] [data-finding=error]').waitFor({ timeout: LIVE_MS });
    const finding = await page.locator('[data-route="default/details-broken"] [data-finding=error]').textContent();
    assert(/details-v9/.test(finding), `finding: ${finding}`);
    assert(await page.evaluate(() => window.__notReloaded === true), 'the page was reloaded');
    await shot(page, 'routes-applied');
    cli('delete', '-f', broken);
    cli('delete', 'httproute', 'reviews');
    await page.locator('[data-route="default/reviews"]').waitFor({ state: 'detached', timeout: LIVE_MS });
    const problems = w.take();
    assert(!problems.length, problems.join('\n'));
    await page.close();
    return `shown ${took} ms after plexus apply`;
  });

  // Performance runs: two `plexus bench` runs stored by the control plane appear without a
  // reload; one shows its latency distribution, two side by side compare.
  await check('performance runs: stored runs listed, a distribution, a comparison', async () => {
    const page = await context.newPage();
    const w = watch(page);
    await page.goto(`${BASE}/performance`);
    await loaded(page);
    await page.evaluate(() => { window.__notReloaded = true; });
    const ids = [];
    for (const name of ['baseline', 'again']) {
      const out = cli('bench', `${INGRESS}/productpage`, '--rate', '20', '--duration', '2s', '--warmup', '0', '--label', `name=${name}`);
      const m = /as run ([0-9a-f-]+)/.exec(out);
      assert(m, `plexus bench did not store its result:\n${out}`);
      ids.push(m[1]);
    }
    for (const id of ids) await page.locator(`[data-run="${id}"]`).waitFor({ timeout: 7000 });
    await page.locator(`[data-run="${ids[0]}"] td:nth-child(2)`).click();
    const detail = page.locator(`[data-run-detail="${ids[0]}"]`);
    await detail.waitFor({ timeout: 3000 });
    const bars = await detail.locator('svg.histogram rect').count();
    assert(bars > 0, 'no histogram bars for the selected run');
    for (const id of ids) await page.locator(`[data-run="${id}"] input[type=checkbox]`).check();
    const compared = page.locator(`[data-compare="${ids.join(',')}"]`);
    await compared.waitFor({ timeout: 3000 });
    const text = await compared.textContent();
    assert(/baseline/.test(text) && /again/.test(text), `comparison names both runs: ${text.slice(0, 200)}`);
    assert(await page.evaluate(() => window.__notReloaded === true), 'the page was reloaded');
    await shot(page, 'performance-compare');
    const problems = w.take();
    assert(!problems.length, problems.join('\n'));
    await page.close();
    return `${bars} bars`;
  });

  // 6. A 50-service graph: no node label overlaps another, no edge label overlaps a node label
  // (or another edge label).
  await check('a 50-service graph is laid out with no overlapping labels', async () => {
    const graph = syntheticGraph(50);
    const page = await context.newPage();
    const w = watch(page);
    await page.route('**/api/v1/graph*', (route) => route.fulfill({ json: graph }));
    await page.goto(`${BASE}/topology`);
    await page.waitForFunction((n) => document.querySelectorAll('g.node').length === n, graph.nodes.length, { timeout: 10000 });
    const boxes = await page.evaluate(() => {
      const box = (el) => {
        const r = el.getBoundingClientRect();
        return { id: el.getAttribute('data-node-id') || el.getAttribute('data-edge'), x: r.left, y: r.top, w: r.width, h: r.height };
      };
      return {
        nodes: [...document.querySelectorAll('g.node')].map(box),
        nodeLabels: [...document.querySelectorAll('g.node text')].map((t) => ({ ...box(t), id: t.closest('g.node').getAttribute('data-node-id') })),
        edgeLabels: [...document.querySelectorAll('g.edge-label')].map(box),
      };
    });
    const overlap = (a, b) => a.x < b.x + b.w - 0.5 && b.x < a.x + a.w - 0.5 && a.y < b.y + b.h - 0.5 && b.y < a.y + a.h - 0.5;
    const problems = [];
    for (let i = 0; i < boxes.nodes.length; i++) {
      for (let j = i + 1; j < boxes.nodes.length; j++) {
        if (overlap(boxes.nodes[i], boxes.nodes[j])) problems.push(`nodes ${boxes.nodes[i].id} and ${boxes.nodes[j].id} overlap`);
      }
    }
    for (const a of boxes.nodeLabels) {
      for (const b of boxes.nodeLabels) {
        if (a.id < b.id && overlap(a, b)) problems.push(`labels of ${a.id} and ${b.id} overlap`);
      }
    }
    for (const e of boxes.edgeLabels) {
      for (const n of boxes.nodes) if (overlap(e, n)) problems.push(`edge label ${e.id} overlaps node ${n.id}`);
    }
    for (let i = 0; i < boxes.edgeLabels.length; i++) {
      for (let j = i + 1; j < boxes.edgeLabels.length; j++) {
        if (overlap(boxes.edgeLabels[i], boxes.edgeLabels[j])) problems.push(`edge labels ${boxes.edgeLabels[i].id} and ${boxes.edgeLabels[j].id} overlap`);
      }
    }
    const services = new Set(graph.nodes.map((n) => n.service));
    for (const name of services) {
      if (!(await page.locator(`g.node[data-service="${name}"]`).count())) problems.push(`service ${name} is not shown`);
    }
    assert(boxes.edgeLabels.length === graph.edges.length, `${boxes.edgeLabels.length} edge labels for ${graph.edges.length} edges`);
    await shot(page, 'topology-50-services');
    // The whole graph at once, scaled to the window.
    await page.locator('.toolbar input[type=checkbox]').check();
    await shot(page, 'topology-50-services-fit');
    problems.push(...w.take());
    assert(!problems.length, problems.slice(0, 20).join('\n'));
    await page.close();
    return `${graph.nodes.length} nodes, ${graph.edges.length} edges`;
  });

  // The control plane going away shows a banner instead of errors thrown in the page.
  await check('an unreachable control plane shows a banner, then recovers', async () => {
    const page = await context.newPage();
    const w = watch(page);
    await page.goto(`${BASE}/services`);
    await loaded(page);
    await page.route('**/api/v1/**', (route) => route.abort('connectionrefused'));
    await page.locator('#banner', { hasText: 'unreachable' }).waitFor({ timeout: 6000 });
    await shot(page, 'unreachable');
    await page.unroute('**/api/v1/**');
    await page.locator('#banner').waitFor({ state: 'hidden', timeout: 6000 });
    // The refused requests log "Failed to load resource" by design; nothing else may.
    const problems = w.take().filter((p) => !/ERR_CONNECTION_REFUSED|Failed to load resource: net::/.test(p));
    assert(!problems.length, problems.join('\n'));
    await page.close();
  });

  // 7. A narrow window (400×800): every page fits its width.
  const narrow = await browser.newContext({ viewport: { width: 400, height: 800 } });
  for (const path of PAGES) {
    await check(`page ${path} fits a 400 px wide window`, async () => {
      const page = await narrow.newPage();
      const w = watch(page);
      await page.goto(BASE + path);
      await loaded(page);
      await sleep(1500);
      const widths = await page.evaluate(() => ({
        doc: document.documentElement.scrollWidth,
        body: document.body.scrollWidth,
        view: document.documentElement.clientWidth,
      }));
      await shot(page, `narrow-${nameOf(path)}`);
      assert(widths.doc <= widths.view && widths.body <= widths.view, `content ${widths.doc}/${widths.body} px wide in a ${widths.view} px window`);
      const problems = w.take();
      assert(!problems.length, problems.join('\n'));
      await page.close();
    });
  }
  await check('the menu opens on a narrow window', async () => {
    const page = await narrow.newPage();
    await page.goto(`${BASE}/`);
    await loaded(page);
    assert(!(await page.locator('nav a[href="/topology"]').isVisible()), 'the nav should be folded');
    await page.locator('#menu-toggle').click();
    await page.locator('nav a[href="/topology"]').click();
    await page.locator('section.page[data-page="/topology"]').waitFor({ timeout: 3000 });
    await page.close();
  });
  await narrow.close();
} finally {
  await browser.close();
}

console.log(`screenshots: ${SHOTS}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
