// The dashboard's shell: picks the page from the path (History API routing, so every page
// path also loads directly), refreshes it every two seconds, and shows a banner instead of
// throwing when the control plane cannot be reached.

import { ApiError, Unreachable } from '/assets/js/api.js';
import { h, replace } from '/assets/js/dom.js';
import { clock } from '/assets/js/format.js';
import overview from '/assets/js/pages/overview.js';
import topology from '/assets/js/pages/topology.js';
import { services, workloads } from '/assets/js/pages/metrics.js';
import routes from '/assets/js/pages/routes.js';
import policies from '/assets/js/pages/policies.js';
import tap from '/assets/js/pages/tap.js';
import certificates from '/assets/js/pages/certificates.js';
import performance from '/assets/js/pages/performance.js';

const PAGES = {
  '/': overview,
  '/topology': topology,
  '/services': services,
  '/workloads': workloads,
  '/routes': routes,
  '/policies': policies,
  '/tap': tap,
  '/certificates': certificates,
  '/performance': performance,
};

/** How often pages refresh (each page may ask for another period). */
const PERIOD_MS = 2000;

const main = document.getElementById('main');
const banner = document.getElementById('banner');
const live = document.getElementById('live');
const nav = document.getElementById('nav');
const menuToggle = document.getElementById('menu-toggle');

/** The page on screen: {path, view, timer, generation}. */
let current = null;
let generation = 0;

function showBanner(text) {
  if (text) {
    banner.textContent = text;
    banner.hidden = false;
  } else if (!banner.hidden) {
    banner.hidden = true;
    banner.textContent = '';
  }
}

/** What pages get: the way to report an update, and to navigate. */
const app = {
  navigate,
  /** Pages call this after a successful update they made on their own (streams). */
  updated() {
    live.textContent = `updated ${clock(new Date())}`;
    showBanner(null);
  },
  /** Pages call this with a failure of their own (streams); the banner shows it. */
  failed(e) {
    report(e);
  },
};

function report(e) {
  if (e instanceof Unreachable) {
    showBanner('Control plane unreachable — retrying every 2 s. Showing the last data received.');
    live.textContent = 'unreachable';
  } else if (e instanceof ApiError) {
    showBanner(`The control plane answered an error: ${e.message}`);
  } else if (e && e.name === 'AbortError') {
    // a page went away mid-request
  } else {
    showBanner(`Could not update this page: ${(e && e.message) || e}`);
  }
}

async function tick(gen) {
  if (!current || current.generation !== gen) return;
  const view = current.view;
  if (!document.hidden && view.refresh) {
    try {
      await view.refresh();
      if (current && current.generation === gen) app.updated();
    } catch (e) {
      if (current && current.generation === gen) report(e);
    }
  }
  if (current && current.generation === gen) {
    current.timer = setTimeout(() => tick(gen), view.period || PERIOD_MS);
  }
}

function markNav(path) {
  for (const a of nav.querySelectorAll('a')) {
    if (a.getAttribute('href') === path) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

/** Shows the page of `path` (with its query); `push` adds a history entry. */
function navigate(target, push = true) {
  const url = new URL(target, location.origin);
  const path = url.pathname.replace(/\/+$/, '') || '/';
  const page = PAGES[path];
  if (push) history.pushState({}, '', url.pathname + url.search);
  if (current) {
    clearTimeout(current.timer);
    try {
      if (current.view.unmount) current.view.unmount();
    } catch (e) {
      console.warn('unmount', e);
    }
  }
  generation += 1;
  const gen = generation;
  replace(main);
  markNav(path);
  nav.classList.remove('open');
  menuToggle.setAttribute('aria-expanded', 'false');
  if (!page) {
    document.title = 'Not found · Plexus';
    main.append(h('h1', {}, 'No such page'), h('p', {}, h('a', { href: '/', 'data-nav': true }, 'Back to the overview')));
    current = null;
    return;
  }
  document.title = `${page.title} · Plexus`;
  const root = h('section', { class: 'page', 'data-page': path });
  main.append(root);
  const view = page.mount(root, app) || {};
  current = { path, view, timer: null, generation: gen };
  tick(gen);
}

document.addEventListener('click', (e) => {
  const a = e.target instanceof Element ? e.target.closest('a[data-nav]') : null;
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const url = new URL(a.href, location.origin);
  if (url.origin !== location.origin) return;
  e.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', () => navigate(location.pathname + location.search, false));

document.addEventListener('visibilitychange', () => {
  if (!document.hidden && current) {
    clearTimeout(current.timer);
    tick(current.generation);
  }
});

menuToggle.addEventListener('click', () => {
  const open = nav.classList.toggle('open');
  menuToggle.setAttribute('aria-expanded', String(open));
});

// A rejected promise nobody awaited is a bug; it also shows on the banner (and stays in the
// console, where the browser tests look for it).
window.addEventListener('unhandledrejection', (e) => report(e.reason));

navigate(location.pathname + location.search, false);
