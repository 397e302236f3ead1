//! The PROXY protocol v2 as a load balancer speaks it, written here from the specification
//! (haproxy.org/download/2.9/doc/proxy-protocol.txt), apart from the node's parser: the header
//! HAProxy's `send-proxy-v2` puts in front of a client's bytes, and a balancer for in-process
//! tests that does the same from a loopback address of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The address a test balancer connects from (Linux routes all of 127.0.0.0/8 to loopback):
/// the one a node under test lists in `node.proxy_protocol_from`.
pub const BALANCER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A version 2 PROXY header for a TCP client at `source` that connected to `destination`.
pub fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    // Version 2, command PROXY.
    h.push(0x21);
    let (family, mut addrs) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (0x21, [s.octets(), d.octets()].concat()),
        _ => panic!("a header names addresses of one family"),
    };
    addrs.extend(source.port().to_be_bytes());
    addrs.extend(destination.port().to_be_bytes());
    h.push(family);
    h.extend((addrs.len() as u16).to_be_bytes());
    h.extend(addrs);
    h
}

/// A TCP connection to `to` from `from` (port chosen by the system).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A load balancer in front of one listener, as HAProxy in TCP mode with `send-proxy-v2`: each
/// client it accepts is relayed to the listener over a connection from [`BALANCER_IP`] that
/// starts with a header naming the client. Runs until the test's runtime ends.
pub struct Balancer {
    pub port: u16,
    /// Every client it relayed, in order.
    pub clients: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    pub async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients = Arc::new(Mutex::new(Vec::new()));
        let seen = clients.clone();
        tokio::spawn(async move {
            while let Ok((mut client, peer)) = listener.accept().await {
                seen.lock().unwrap().push(peer);
                let local = client.local_addr().unwrap();
                tokio::spawn(async move {
                    let Ok(mut node) = connect_from(BALANCER_IP.into(), to).await else {
                        return;
                    };
                    if node.write_all(&v2_header(peer, local)).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
                    }
                });
            }
        });
        Self { port, clients }
    }

    /// The clients relayed so far.
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.clients.lock().unwrap().clone()
    }
}
