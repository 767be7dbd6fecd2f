//! The CLI against a cluster (SPEC §11): `--kubeconfig FILE` (or `KUBECONFIG` when no
//! `--server` is given), a port-forward to the control-plane pod's admin port 7701, the admin
//! token from Secret `plexus-admin-token`, and `plexus check`'s Kubernetes checks.
