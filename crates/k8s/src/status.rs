//! Status write-back: `Accepted` and `ResolvedRefs` conditions on HTTPRoute/GRPCRoute and the
//! other custom resources, written by the leader only.
