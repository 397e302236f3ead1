//! A Kafka-protocol broker that requires TLS and a client certificate: a Tansu broker of its
//! own (memory-only), behind HAProxy terminating TLS with `verify required`. The broker
//! advertises HAProxy's port, so every connection a client makes after the bootstrap goes
//! through TLS too. (Tansu 0.6 serves no TLS itself; a TLS proxy in front of the brokers is a
//! deployment of its own in the field.) The CA, the broker's certificate (for 127.0.0.1) and a
//! client certificate are made with the openssl CLI.

use crate::{env, free_port};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

pub struct TlsBroker {
    pub dir: TempDir,
    /// `127.0.0.1:PORT` of the TLS listener: what clients bootstrap from.
    pub brokers: String,
    /// Tansu's own port, plain: for the test's setup only (topics).
    plain: u16,
    tansu: Child,
    haproxy: Child,
}

fn openssl(dir: &Path, args: &[&str]) {
    crate::run(Command::new("openssl").current_dir(dir).args(args));
}

/// A key and a certificate `NAME.key`, `NAME.crt` signed by `ca` (a prefix: `ca.key`,
/// `ca.crt`), with the extensions of `ext` (an `openssl x509 -extfile` line).
fn signed_cert(dir: &Path, ca: &str, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), format!("{ext}\n")).unwrap();
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &extfile,
        ],
    );
}

/// A CA `NAME.key`, `NAME.crt`.
pub fn ca(dir: &Path, name: &str, subject: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

impl TlsBroker {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "ca", "/CN=Vigil test Kafka CA");
        signed_cert(
            d,
            "ca",
            "broker",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1",
        );
        signed_cert(
            d,
            "ca",
            "client",
            "/CN=vigil-node",
            "extendedKeyUsage=clientAuth",
        );
        let pem = [
            std::fs::read(d.join("broker.crt")).unwrap(),
            std::fs::read(d.join("broker.key")).unwrap(),
        ]
        .concat();
        std::fs::write(d.join("broker.pem"), pem).unwrap();
        let (plain, tls) = (free_port(), free_port());
        std::fs::write(
            d.join("haproxy.cfg"),
            format!(
                "global\n    maxconn 256\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10m\n    timeout server 10m\n\
                 frontend kafka\n    bind 127.0.0.1:{tls} ssl crt {dir}/broker.pem ca-file {dir}/ca.crt verify required\n    default_backend tansu\n\
                 backend tansu\n    server tansu 127.0.0.1:{plain}\n",
                dir = d.display()
            ),
        )
        .unwrap();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        // The working directory is the broker's own: tansu reads a .env file from there.
        let tansu = Command::new(env().get("VIGIL_TANSU"))
            .current_dir(d)
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{plain}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{tls}"))
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(log("tansu.log"))
            .stderr(log("tansu.err"))
            .spawn()
            .expect("tansu runs");
        let haproxy = Command::new("haproxy")
            .arg("-f")
            .arg(d.join("haproxy.cfg"))
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log("haproxy.log"))
            .stderr(log("haproxy.err"))
            .spawn()
            .expect("haproxy runs (deploy/dev/setup.sh installs it)");
        let broker = Self {
            dir,
            brokers: format!("127.0.0.1:{tls}"),
            plain,
            tansu,
            haproxy,
        };
        for _ in 0..100 {
            if port_open(plain) && port_open(tls) {
                return broker;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the TLS broker did not start: {} {}",
            std::fs::read_to_string(broker.dir.path().join("tansu.err")).unwrap_or_default(),
            std::fs::read_to_string(broker.dir.path().join("haproxy.err")).unwrap_or_default()
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The librdkafka settings of a client of this broker: TLS, the broker verified against
    /// its CA (`ca`: another CA file instead), the client certificate presented.
    pub fn client_options(&self, ca: &Path) -> Vec<(String, String)> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            ("security.protocol".into(), "ssl".into()),
            ("ssl.ca.location".into(), ca.display().to_string()),
            (
                "ssl.certificate.location".into(),
                path(self.path("client.crt")),
            ),
            ("ssl.key.location".into(), path(self.path("client.key"))),
        ]
    }

    /// A fresh topic of one partition (made over the plain port).
    pub fn create_topic(&self) -> String {
        crate::create_topic_on(&format!("tcp://127.0.0.1:{}", self.plain), 1)
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        for child in [&mut self.haproxy, &mut self.tansu] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
