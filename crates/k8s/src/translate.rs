//! Pure translation of Kubernetes objects (Services, Pods, EndpointSlices, ServiceAccounts,
//! Namespaces, the custom resources) into Plexus resources. No I/O.
