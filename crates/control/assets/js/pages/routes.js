// /routes: HTTPRoutes, GRPCRoutes and TrafficSplits with their matches, filters, backends
// and weights, and what `plexus check` finds wrong with each.

import { getAll } from '/assets/js/api.js';
import { h, s, replace, empty, pill, keepOpen, changes } from '/assets/js/dom.js';
import { pct } from '/assets/js/format.js';
import { resourceCard, findingsFor, findingList, refText, brief, dl, keyOf } from '/assets/js/resources.js';

const ROUTE_KINDS = ['HTTPRoute', 'GRPCRoute', 'TrafficSplit', 'HTTPRouteGroup'];

function matchText(m) {
  const parts = [];
  if (m.path) parts.push(`path ${m.path.type || 'PathPrefix'} ${m.path.value ?? '/'}`);
  if (m.method && typeof m.method === 'string') parts.push(`method ${m.method}`);
  if (m.method && typeof m.method === 'object') parts.push(`method ${m.method.service || '*'}/${m.method.method || '*'}${m.method.type && m.method.type !== 'Exact' ? ` (${m.method.type})` : ''}`);
  for (const hd of m.headers || []) parts.push(`header ${hd.name} ${hd.type === 'RegularExpression' ? '~' : '='} ${hd.value}`);
  for (const q of m.queryParams || []) parts.push(`query ${q.name} ${q.type === 'RegularExpression' ? '~' : '='} ${q.value}`);
  return parts.join(' and ') || 'everything';
}

function filterText(f) {
  switch (f.type) {
    case 'RequestHeaderModifier':
    case 'ResponseHeaderModifier': {
      const m = f.requestHeaderModifier || f.responseHeaderModifier || {};
      const ops = [];
      for (const x of m.set || []) ops.push(`set ${x.name}: ${x.value}`);
      for (const x of m.add || []) ops.push(`add ${x.name}: ${x.value}`);
      for (const x of m.remove || []) ops.push(`remove ${x}`);
      return `${f.type}: ${ops.join(', ')}`;
    }
    case 'RequestMirror': {
      const m = f.requestMirror || {};
      return `mirror to ${refText(m.backendRef)}${m.percent !== undefined ? ` (${m.percent}%)` : ''}`;
    }
    case 'ExtensionRef': return `${(f.extensionRef || {}).kind || 'extension'} ${(f.extensionRef || {}).name || ''}`;
    case 'RequestRedirect': return `redirect: ${brief(f.requestRedirect)}`;
    case 'URLRewrite': return `rewrite: ${brief(f.urlRewrite)}`;
    default: return `${f.type}: ${brief(f[Object.keys(f).find((k) => k !== 'type')])}`;
  }
}

/** Backends with their share of the traffic as a bar. */
function backends(list, nameOf) {
  if (!list || !list.length) return h('span', { class: 'bad' }, 'no backends');
  const weights = list.map((b) => (b.weight === undefined || b.weight === null ? 1 : Number(b.weight)));
  const total = weights.reduce((a, w) => a + w, 0);
  return h('div', { class: 'backends' }, list.map((b, i) => {
    const share = total ? weights[i] / total : 0;
    return h('div', { class: 'backend', 'data-backend': nameOf(b), 'data-weight': weights[i] },
      h('span', {}, nameOf(b), h('span', { class: 'muted' }, ` weight ${weights[i]}`)),
      h('span', { class: 'weight-bar', title: pct(share) },
        s('svg', { viewBox: '0 0 100 10', preserveAspectRatio: 'none' }, s('rect', { x: 0, y: 0, height: 10, width: (share * 100).toFixed(2), class: 'bar' }))));
  }));
}

function httpRoute(r) {
  const spec = r.spec || {};
  const rules = (spec.rules || []).map((rule, i) => h('div', { class: 'rule', 'data-rule': i },
    dl([
      ['rule', String(i)],
      ['matches', (rule.matches || []).length ? (rule.matches || []).map(matchText).join(' | ') : 'everything'],
      (rule.filters || []).length ? ['filters', rule.filters.map(filterText).join('; ')] : null,
      rule.timeouts ? ['timeouts', brief(rule.timeouts)] : null,
      rule.retry ? ['retry', brief(rule.retry)] : null,
      rule.sessionPersistence ? ['session', brief(rule.sessionPersistence)] : null,
    ].filter(Boolean)),
    backends(rule.backendRefs, (b) => refText(b))));
  return h('div', {},
    dl([
      ['attached to', (spec.parentRefs || []).map(refText).join(', ') || '—'],
      spec.hostnames ? ['hostnames', spec.hostnames.join(', ')] : null,
    ].filter(Boolean)),
    rules.length ? rules : h('p', { class: 'muted' }, 'no rules'));
}

function trafficSplit(r) {
  const spec = r.spec || {};
  return h('div', {},
    dl([
      ['splits', spec.service || '—'],
      (spec.matches || []).length ? ['matches', spec.matches.map((m) => `${m.kind || ''} ${m.name}`).join(', ')] : null,
    ].filter(Boolean)),
    backends(spec.backends, (b) => b.service));
}

function routeGroup(r) {
  return dl((r.spec.matches || []).map((m) => [m.name, brief(Object.fromEntries(Object.entries(m).filter(([k]) => k !== 'name')))]));
}

export default {
  title: 'Routes',
  mount(root) {
    const body = h('div', {});
    root.append(h('h1', {}, 'Routes'),
      h('p', { class: 'muted' }, 'HTTPRoutes and GRPCRoutes (Gateway API), TrafficSplits and HTTPRouteGroups (SMI), with what plexus check finds wrong with each.'),
      body);
    const changed = changes();
    const refresh = async () => {
      const d = await getAll({
        http: '/api/v1/resources/httproutes?namespace=all',
        grpc: '/api/v1/resources/grpcroutes?namespace=all',
        splits: '/api/v1/resources/trafficsplits?namespace=all',
        groups: '/api/v1/resources/httproutegroups?namespace=all',
        findings: '/api/v1/findings',
      });
      if (!changed(d)) return;
      const findings = d.findings.findings || [];
      const sections = [
        ['HTTPRoutes', d.http.items, httpRoute],
        ['GRPCRoutes', d.grpc.items, httpRoute],
        ['TrafficSplits', d.splits.items, trafficSplit],
        ['HTTPRouteGroups', d.groups.items, routeGroup],
      ];
      const routeFindings = findings.filter((f) => ROUTE_KINDS.includes(f.kind));
      const errors = routeFindings.filter((f) => f.severity === 'error').length;
      const total = sections.reduce((a, [, items]) => a + (items || []).length, 0);
      keepOpen(body, () => replace(body,
        h('p', {}, `${total} route resource${total === 1 ? '' : 's'} · `,
          routeFindings.length ? pill(`${errors} error${errors === 1 ? '' : 's'}, ${routeFindings.length - errors} warning${routeFindings.length - errors === 1 ? '' : 's'}`, errors ? 'bad' : 'warn') : pill('no findings', 'ok')),
        total ? null : empty('No routes: every request goes to the Service it names, spread over its workloads. Apply an HTTPRoute (plexus apply -f) to split, match or rewrite traffic.'),
        sections.filter(([, items]) => (items || []).length).map(([title, items, render]) => [
          h('h2', {}, title),
          h('div', { class: 'resources' }, items.map((r) => {
            const card = resourceCard(r, findingsFor(findings, r), render(r));
            card.setAttribute('data-route', keyOf(r));
            return card;
          })),
        ]),
        // Findings about objects not on this page but about routing (none today; kept so a
        // new kind of finding is never hidden).
        findingList(routeFindings.filter((f) => !sections.some(([, items]) => (items || []).some((r) => findingsFor([f], r).length))), { withObject: true })));
    };
    return { refresh };
  },
};
