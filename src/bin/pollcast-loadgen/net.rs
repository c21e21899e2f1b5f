//! Where the load goes and comes from: several target servers and several loopback source
//! addresses, so that one audience can outgrow one process's limits.
//!
//! Why several source addresses: a TCP connection is named by (source address, source port,
//! target address, target port), and a source address has about 28,000 ephemeral ports
//! (`net.ipv4.ip_local_port_range`); pollcast also caps the connections of one peer address
//! (`http.max_connections_per_ip`, 5000 by default). Every address of 127.0.0.0/8 is this
//! machine, so `127.0.0.2`, `127.0.0.3`, … are as many more clients, without configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};
use tokio::net::{TcpSocket, TcpStream};

/// One pollcast to send load to.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port`, as given in the URL.
    pub host: String,
}

impl Target {
    /// Resolves an `http://host:port` URL.
    pub async fn resolve(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--url must start with http:// (got {url})");
        };
        let host = rest.trim_end_matches('/').to_owned();
        let addr = tokio::net::lookup_host(&host)
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        Ok(Self { addr, host })
    }
}

/// `--source-addrs`: a count N (127.0.0.1 to 127.0.0.N) or a comma-separated list of
/// addresses. Empty: the system chooses.
pub fn parse_sources(text: &str) -> Result<Vec<IpAddr>, String> {
    if let Ok(n) = text.trim().parse::<u8>() {
        if n == 0 {
            return Err("a count of source addresses must be 1 to 254".into());
        }
        return Ok((1..=n.min(254))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect());
    }
    text.split(',')
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|e| format!("{a}: {e} (expected an IP address or a count)"))
        })
        .collect()
}

/// The (target, source) pair of the `i`-th connection of a kind: every pair in turn, so
/// that each target gets connections from each source. The target is its index among
/// `targets` of them: a client moves on to the next when its own goes away.
pub fn pick_at(i: usize, targets: usize, sources: &[IpAddr]) -> (usize, Option<IpAddr>) {
    let pairs = targets * sources.len().max(1);
    let pair = i % pairs;
    (pair % targets, sources.get(pair / targets).copied())
}

/// Connects to `addr` from `source` (any port) when given.
pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    no_port_at_bind(&socket);
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Why: binding to port 0 picks the port at once, unique among every socket of the source
/// address, so one source would hold only ~28,000 connections whatever their targets. With
/// `IP_BIND_ADDRESS_NO_PORT` the port is picked at connect, unique per target instead.
#[cfg(target_os = "linux")]
fn no_port_at_bind(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and option value of the size given; failure only loses the
    // optimisation.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn no_port_at_bind(_: &TcpSocket) {}

/// Ephemeral ports per (source, target) pair (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut ends = range.split_whitespace().map(|p| p.parse::<u64>().ok());
    let (low, high) = (ends.next()??, ends.next()??);
    Some(high.saturating_sub(low) + 1)
}

/// Connections one peer address may hold on a pollcast by default
/// (`http.max_connections_per_ip`).
pub const SERVER_PER_IP_CAP: usize = 5_000;

/// Raises this process's open-file limit to the hard one and checks the plan against it and
/// against the ports: too many connections for one process is an error that says what to
/// do, a pair over the server's per-address cap a warning.
pub fn check_capacity(
    connections: usize,
    targets: &[Target],
    sources: &[IpAddr],
) -> anyhow::Result<()> {
    // Why a margin: stdio, the runtime, the verifier's and the prober's connections.
    const MARGIN: u64 = 64;
    let soft = match pollcast::fdlimit::raise_to_hard() {
        Ok((_, now)) => now.soft,
        Err(_) => u64::MAX,
    };
    if connections as u64 + MARGIN > soft {
        bail!(
            "{connections} connections need more file descriptors than this process may open \
             ({soft}, the hard limit): run several load generators with a share each and \
             merge their reports (pollcast-loadgen merge A.json B.json)"
        );
    }
    let pairs = targets.len() * sources.len().max(1);
    let per_pair = connections.div_ceil(pairs);
    if let Some(ports) = ephemeral_ports()
        && per_pair as u64 > ports
    {
        bail!(
            "{per_pair} connections per (source, target) pair but only {ports} ephemeral \
             ports: add source addresses (--source-addrs) or targets"
        );
    }
    let per_source = connections.div_ceil(sources.len().max(1) * targets.len());
    if per_source > SERVER_PER_IP_CAP {
        eprintln!(
            "pollcast-loadgen: {per_source} connections per source address and server, over \
             pollcast's default http.max_connections_per_ip ({SERVER_PER_IP_CAP}): add \
             --source-addrs unless the servers allow more"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_a_count_or_a_list() {
        assert_eq!(
            parse_sources("3").unwrap(),
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        assert_eq!(
            parse_sources("127.0.0.2, 127.0.0.9").unwrap(),
            ["127.0.0.2", "127.0.0.9"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        assert!(parse_sources("0").is_err());
        assert!(parse_sources("127.0.0.2,nope").is_err());
    }

    #[test]
    fn connections_take_every_target_and_source_pair_in_turn() {
        let target = |port| Target {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            host: format!("127.0.0.1:{port}"),
        };
        let targets = [target(1), target(2)];
        let sources = parse_sources("3").unwrap();
        let mut seen = std::collections::BTreeMap::<_, usize>::new();
        for i in 0..60 {
            let (t, s) = pick_at(i, targets.len(), &sources);
            *seen
                .entry((targets[t].addr.port(), s.unwrap()))
                .or_default() += 1;
        }
        assert_eq!(seen.len(), 6);
        assert!(seen.values().all(|&n| n == 10), "{seen:?}");
        assert_eq!(pick_at(5, targets.len(), &[]), (1, None));
    }
}
