// /: mesh health at a glance: the control plane, proxies and their sync state, resource
// counts, certificate expiry, check findings and the busiest services.

import { get, getAll, ApiError } from '/assets/js/api.js';
import { h, replace, card, table, empty, pill } from '/assets/js/dom.js';
import { rate, pct, ms, duration, successTone } from '/assets/js/format.js';

/** Days below which a CA certificate (anchor, issuer) is flagged, as `plexus check` does. */
const CA_WARN_DAYS = 60;

function expiryTone(seconds, warnSeconds) {
  if (seconds === null || seconds === undefined) return '';
  if (seconds <= 0) return 'bad';
  return seconds < warnSeconds ? 'warn' : 'ok';
}

export default {
  title: 'Overview',
  mount(root) {
    const cards = h('div', { class: 'cards' });
    const top = h('div', {});
    root.append(h('h1', {}, 'Mesh overview'), cards, top);
    const refresh = async () => {
      const [d, identity] = await Promise.all([
        getAll({ overview: '/api/v1/overview', stat: '/api/v1/stat?kind=service&window=1m' }),
        // A certificate authority in trouble must not hide the rest of the overview.
        get('/api/v1/identity').catch((e) => (e instanceof ApiError ? { error: e.message } : Promise.reject(e))),
      ]);
      d.identity = identity;
      const o = d.overview;
      const c = o.counts || {};
      const p = o.proxies || {};
      const f = o.findings || {};
      const id = d.identity || {};
      const anchor = id.trustAnchor;
      const issuer = id.issuer;
      const behind = (p.connected || 0) - (p.inSync || 0);
      const routes = (c.HTTPRoute || 0) + (c.GRPCRoute || 0) + (c.TrafficSplit || 0);
      const policies = (c.AuthorizationPolicy || 0) + (c.ResiliencePolicy || 0) + (c.RateLimitPolicy || 0) + (c.TrafficTarget || 0);
      const soonest = (id.proxies || []).filter((x) => x.expiresInSeconds !== null && x.expiresInSeconds !== undefined)
        .sort((a, b) => a.expiresInSeconds - b.expiresInSeconds)[0];
      const caSeconds = Math.min(anchor ? anchor.expiresInSeconds : Infinity, issuer ? issuer.expiresInSeconds : Infinity);
      const caTone = expiryTone(Number.isFinite(caSeconds) ? caSeconds : null, CA_WARN_DAYS * 86400);
      replace(cards,
        card('Control plane', h('span', { class: 'ok' }, 'up'), `version ${o.version} · config revision ${o.revision}`, { 'data-card': 'control-plane' }),
        card('Proxies', `${p.connected || 0}`, h('span', {}, behind ? pill(`${behind} not in sync`, 'warn') : pill('all in sync', 'ok'), ' ',
          Object.entries(p.byMode || {}).map(([m, n]) => `${n} ${m}`).join(', ')), { 'data-card': 'proxies' }),
        card('Services', `${c.Service || 0}`, `${c.Workload || 0} workloads`, { 'data-card': 'services' }),
        card('Routes', `${routes}`, `${c.HTTPRoute || 0} HTTP, ${c.GRPCRoute || 0} gRPC, ${c.TrafficSplit || 0} splits`, { 'data-card': 'routes' }),
        card('Policies', `${policies}`, `${c.AuthorizationPolicy || 0} authorization, ${c.ResiliencePolicy || 0} resilience, ${c.RateLimitPolicy || 0} rate limit`, { 'data-card': 'policies' }),
        card('Check findings', h('span', { class: f.errors ? 'bad' : f.warnings ? 'warn' : 'ok' }, `${f.errors || 0} ✗ · ${f.warnings || 0} ‼`),
          h('span', {}, h('a', { href: '/routes', 'data-nav': true }, 'routes'), ' · ', h('a', { href: '/policies', 'data-nav': true }, 'policies')), { 'data-card': 'findings' }),
        card('Certificates', h('span', { class: id.error ? 'bad' : caTone }, id.error ? 'unavailable' : anchor || issuer ? `CA ${duration(caSeconds)} left` : 'unknown'),
          id.error ? id.error : h('span', {}, issuer ? `issuer ${duration(issuer.expiresInSeconds)}` : 'no issuer', anchor ? ` · anchor ${duration(anchor.expiresInSeconds)}` : '',
            soonest ? ` · next leaf expiry ${duration(soonest.expiresInSeconds)} (${soonest.workload})` : '', ' · ',
            h('a', { href: '/certificates', 'data-nav': true }, 'details')), { 'data-card': 'certificates' }));
      const rows = [...(d.stat.rows || [])].sort((a, b) => b.requestsPerSecond - a.requestsPerSecond).slice(0, 10);
      replace(top, h('h2', {}, 'Busiest services (last minute)'),
        rows.length ? table(
          [{ title: 'service' }, { title: 'rps', class: 'num' }, { title: 'success', class: 'num' }, { title: 'p99', class: 'num' }, { title: 'mTLS', class: 'num' }],
          rows.map((r) => h('tr', {},
            h('td', {}, h('a', { href: `/services?name=${encodeURIComponent(r.name)}`, 'data-nav': true }, r.name)),
            h('td', { class: 'num' }, rate(r.requestsPerSecond)),
            h('td', { class: `num ${successTone(r.successRate)}` }, pct(r.successRate)),
            h('td', { class: 'num' }, ms(r.p99Ms)),
            h('td', { class: 'num' }, pct(r.mtlsShare)))))
          : empty('No requests in the last minute.'));
    };
    return { refresh };
  },
};
