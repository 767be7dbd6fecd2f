//! `KubeStore`: the Kubernetes API as the control plane's store (`plexus control --store
//! kubernetes`). Watches feed the same in-memory resource list the index reads, so proxies see
//! no difference from the file or embedded stores.
