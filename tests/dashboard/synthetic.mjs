// A synthetic service graph, in the shape /api/v1/graph answers, for layout tests.

/**
 * A synthetic mesh of `count` services: an ingress, a few front doors, fan-outs of varied
 * fan-in and name length, a cycle, versions, an external destination and unknown callers.
 */
export function syntheticGraph(count, seed = 42) {
  // mulberry32: small, seeded, the same graph every run.
  let a = seed >>> 0;
  const random = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const words = ['api', 'auth', 'billing', 'cart', 'catalog', 'checkout', 'db', 'email', 'fraud-detection', 'geo', 'inventory',
    'ledger', 'loyalty-points-aggregator', 'media', 'notifications', 'orders', 'payments', 'pricing', 'profile', 'queue',
    'recommendations-engine-canary', 'search', 'session', 'shipping', 'tax', 'ui', 'users', 'warehouse-sync', 'x'];
  const nodes = [];
  const edges = [];
  const add = (service, version, kind = 'service') => {
    const id = kind === 'unknown' ? 'unknown' : kind === 'external' ? service : `default/${service}${version ? `/${version}` : ''}`;
    nodes.push({ id, service, version: version || null, namespace: kind === 'external' || kind === 'unknown' ? null : 'default', kind });
    return id;
  };
  const edge = (source, target) => {
    if (edges.some((e) => e.source === source && e.target === target)) return;
    const requests = Math.floor(random() * 5000);
    edges.push({
      source, target, requests, requestsPerSecond: requests / 60, successRate: random() < 0.8 ? 1 : 0.9 + random() * 0.1,
      p50Ms: random() * 20, p95Ms: random() * 80, p99Ms: random() * 300, mtlsShare: random() < 0.9 ? 1 : random(),
    });
  };
  const ingress = add('ingress-gateway', 'v1', 'ingress');
  const unknown = add('unknown', null, 'unknown');
  const services = [];
  for (let i = 0; services.length < count - 3; i++) {
    const name = `${words[i % words.length]}${i >= words.length ? `-${Math.floor(i / words.length) + 1}` : ''}`;
    const versions = random() < 0.15 ? ['v1', 'v2'] : [null];
    for (const v of versions) if (services.length < count - 3) services.push(add(name, v));
  }
  const external = add('api.payments.example', null, 'external');
  // Front doors, then each service calls one to four services further down the list.
  for (const front of services.slice(0, 3)) edge(ingress, front);
  edge(unknown, services[Math.min(3, services.length - 1)]);
  for (let i = 0; i < services.length; i++) {
    const fanout = i < 6 ? 4 : Math.floor(random() * 3);
    for (let k = 0; k < fanout; k++) {
      const j = i + 1 + Math.floor(random() * Math.min(12, services.length - i - 1));
      if (j < services.length) edge(services[i], services[j]);
    }
  }
  const last = services.length - 1;
  edge(services[Math.min(20, last)], services[Math.min(8, last - 1)]); // a cycle back up the graph
  edge(services[Math.min(10, last - 1)], services[Math.min(11, last)]);
  edge(services[Math.min(11, last)], services[Math.min(10, last - 1)]); // calls both ways
  edge(services[Math.min(5, last)], external);
  edge(services[Math.min(30, last)], external);
  return { window: '1m', group: 'version', nodes, edges };
}
