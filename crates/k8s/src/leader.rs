//! Leader election on the coordination.k8s.io/v1 Lease `plexus-control` in `plexus-system`:
//! singleton duties (status write-back) run only on the leader; every replica serves proxies.
