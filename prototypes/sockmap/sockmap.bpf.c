// SPDX-License-Identifier: GPL-2.0
// PROTOTYPE (issue 21, "below the socket floor"): eBPF sockmap redirection between the two
// ends of a same-host TCP connection, so that the app <-> sidecar hop skips the loopback
// TCP/IP path. Measured, not shipped: see README.md beside this file and docs/PERFORMANCE.md.
//
// - `plexus_sockops` (sock_ops, attached to one cgroup v2 directory) puts every established
//   IPv4 TCP socket of that cgroup into the SOCKHASH `plexus_socks`, keyed by the socket's own
//   view of its connection: (netns, local addr, remote addr).
// - `plexus_sk_msg` (sk_msg, attached to `plexus_socks`) runs on every sendmsg of such a socket
//   and hands the message to the peer socket's receive queue (bpf_msg_redirect_hash with
//   BPF_F_INGRESS) when the peer is in the map; otherwise the message takes the TCP path.
//
// Finding the peer:
// - Direct connections (no NAT): the peer is the socket whose key is ours reversed.
// - Connections REDIRECTed by iptables to a sidecar port (`plexus_ports`): the client's socket
//   sees the original destination, the sidecar's accepted socket sees 127.0.0.1:7710, so the
//   reversed key matches nothing. They are paired by the client's own address (the accepted
//   socket's remote address is the client socket's local address): every active socket is
//   indexed by (netns, local addr) in `plexus_clients`; when a sidecar port accepts a
//   connection, the client socket with that local address is looked up and the two keys are
//   recorded in `plexus_alias`, one per direction. A local address used by two active sockets
//   at once (Linux shares an ephemeral port between connections to different destinations) is
//   ambiguous and never aliased: those connections keep the TCP path.
// Index and alias entries are removed when their socket reaches TCP_CLOSE (BPF_SOCK_OPS_STATE_CB);
// SOCKHASH entries are removed by the kernel when the socket is closed.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

// One socket's own view of its connection. Ports in host byte order; `pad` always zero.
struct sock_key {
	__u64 netns;
	__u32 lip;
	__u32 rip;
	__u16 lport;
	__u16 rport;
	__u32 pad;
};

// An active (connecting) socket's local address.
struct local_key {
	__u64 netns;
	__u32 ip;
	__u16 port;
	__u16 pad;
};

// The active socket(s) using one local address: its remote address, how many, and whether
// more than one (then the address pairs with nothing).
struct client {
	__u32 rip;
	__u16 rport;
	__u16 pad;
	__u32 count;
	__u32 ambiguous;
};

// What a socket took part in (socket-local storage, freed with the socket).
struct sock_state {
	__u8 active;  // counted in plexus_clients
	__u8 aliased; // has a plexus_alias entry
	__u16 pad;
};

enum {
	STAT_DIRECT,  // messages redirected to the reversed-key peer
	STAT_ALIAS,   // messages redirected to an aliased (REDIRECTed connection) peer
	STAT_PASSED,  // messages left to TCP: no peer in the map
	STAT_SOCKETS, // sockets added to plexus_socks
	STAT_PAIRS,   // REDIRECTed connections paired
	STAT_AMBIGUOUS, // active sockets sharing a local address with another
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__uint(key_size, sizeof(struct sock_key));
	__uint(value_size, sizeof(__u32));
} plexus_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct local_key);
	__type(value, struct client);
} plexus_clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct sock_key);
} plexus_alias SEC(".maps");

// The sidecar ports iptables REDIRECTs to (filled by the loader): only connections accepted on
// them are paired by the client's address.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u16);
	__type(value, __u8);
} plexus_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} plexus_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} plexus_stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&plexus_stats, &stat);
	if (n)
		*n += 1;
}

// remote_port of bpf_sock_ops and sk_msg_md is the big-endian port in the u32's network-order
// bytes (shifted on little-endian hosts): ntohl gives the port.
static __always_inline void sockops_key(struct bpf_sock_ops *skops, struct sock_key *k)
{
	k->netns = bpf_get_netns_cookie(skops);
	k->lip = skops->local_ip4;
	k->rip = skops->remote_ip4;
	k->lport = (__u16)skops->local_port;
	k->rport = (__u16)bpf_ntohl(skops->remote_port);
}

static __always_inline void established(struct bpf_sock_ops *skops, int active)
{
	struct sock_key k = {};
	sockops_key(skops, &k);
	if (bpf_sock_hash_update(skops, &plexus_socks, &k, BPF_ANY) != 0)
		return;
	count(STAT_SOCKETS);
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_state *st = bpf_sk_storage_get(&plexus_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;

	if (active) {
		struct local_key lk = {.netns = k.netns, .ip = k.lip, .port = k.lport};
		struct client c = {.rip = k.rip, .rport = k.rport, .count = 1};
		if (bpf_map_update_elem(&plexus_clients, &lk, &c, BPF_NOEXIST) != 0) {
			struct client *old = bpf_map_lookup_elem(&plexus_clients, &lk);
			if (!old)
				return; // map full, or removed meanwhile: not indexed
			__sync_fetch_and_add(&old->count, 1);
			old->ambiguous = 1;
			count(STAT_AMBIGUOUS);
		}
		st->active = 1;
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return;
	}

	// Accepted: on a sidecar port, pair with the client socket whose local address is our
	// remote address (same namespace), unless that is the plain reversed key anyway.
	__u16 lport = k.lport;
	if (!bpf_map_lookup_elem(&plexus_ports, &lport))
		return;
	struct local_key lk = {.netns = k.netns, .ip = k.rip, .port = k.rport};
	struct client *c = bpf_map_lookup_elem(&plexus_clients, &lk);
	if (!c || c->ambiguous)
		return;
	struct sock_key peer = {.netns = k.netns, .lip = k.rip, .lport = k.rport, .rip = c->rip, .rport = c->rport};
	if (peer.rip == k.lip && peer.rport == k.lport)
		return;
	if (bpf_map_update_elem(&plexus_alias, &k, &peer, BPF_ANY) != 0)
		return;
	if (bpf_map_update_elem(&plexus_alias, &peer, &k, BPF_ANY) != 0) {
		bpf_map_delete_elem(&plexus_alias, &k);
		return;
	}
	st->aliased = 1;
	count(STAT_PAIRS);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_state *st = bpf_sk_storage_get(&plexus_state, sk, 0, 0);
	if (!st)
		return;
	struct sock_key k = {};
	sockops_key(skops, &k);
	if (st->aliased) {
		bpf_map_delete_elem(&plexus_alias, &k);
		st->aliased = 0;
	}
	if (st->active) {
		// The client's alias entry (if it was paired) is keyed by its own key too.
		bpf_map_delete_elem(&plexus_alias, &k);
		struct local_key lk = {.netns = k.netns, .ip = k.lip, .port = k.lport};
		struct client *c = bpf_map_lookup_elem(&plexus_clients, &lk);
		if (c && __sync_fetch_and_add(&c->count, -1) == 1)
			bpf_map_delete_elem(&plexus_clients, &lk);
		st->active = 0;
	}
}

SEC("sockops")
int plexus_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		established(skops, 0);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			closed(skops);
		break;
	}
	return 1;
}

SEC("sk_msg")
int plexus_sk_msg(struct sk_msg_md *msg)
{
	if (msg->family != AF_INET)
		return SK_PASS;
	__u64 netns = bpf_get_netns_cookie(msg);
	__u32 lip = msg->local_ip4, rip = msg->remote_ip4;
	__u16 lport = (__u16)msg->local_port, rport = (__u16)bpf_ntohl(msg->remote_port);

	struct sock_key peer = {.netns = netns, .lip = rip, .rip = lip, .lport = rport, .rport = lport};
	// SK_PASS: the peer was found and the message goes to it; SK_DROP: no such key, nothing
	// was set, and returning SK_PASS below lets the message take the TCP path.
	if (bpf_msg_redirect_hash(msg, &plexus_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_DIRECT);
		return SK_PASS;
	}
	struct sock_key own = {.netns = netns, .lip = lip, .rip = rip, .lport = lport, .rport = rport};
	struct sock_key *alias = bpf_map_lookup_elem(&plexus_alias, &own);
	if (alias) {
		struct sock_key target = *alias;
		if (bpf_msg_redirect_hash(msg, &plexus_socks, &target, BPF_F_INGRESS) == SK_PASS) {
			count(STAT_ALIAS);
			return SK_PASS;
		}
	}
	count(STAT_PASSED);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
