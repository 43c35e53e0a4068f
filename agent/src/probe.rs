//! Readiness probes: a TCP connect, or an HTTP GET answered with 2xx/3xx.
//!
//! The HTTP probe speaks just enough HTTP/1.0 to read a status line; pulling an HTTP client into
//! the agent would triple its size.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Tcp { host: String, port: u16 },
    Http { host: String, port: u16, path: String },
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Probe::Http { host, port, path } => write!(f, "http://{host}:{port}{path}"),
        }
    }
}

impl Probe {
    /// `tcp:PORT`, `tcp:HOST:PORT`, or `http://HOST[:PORT]/PATH`.
    pub fn parse(spec: &str) -> Result<Probe, String> {
        if let Some(rest) = spec.strip_prefix("tcp:") {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port),
                None => ("127.0.0.1".to_string(), rest),
            };
            let port = port.parse().map_err(|_| format!("bad port in `{spec}`"))?;
            return Ok(Probe::Tcp { host, port });
        }
        if let Some(rest) = spec.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| format!("bad port in `{spec}`"))?),
                None => (authority, 80),
            };
            if host.is_empty() {
                return Err(format!("no host in `{spec}`"));
            }
            return Ok(Probe::Http { host: host.to_string(), port, path: path.to_string() });
        }
        Err(format!("`{spec}` is not a probe: use tcp:PORT or http://HOST:PORT/PATH"))
    }

    /// One attempt: `Ok(())` when ready.
    pub async fn check(&self) -> Result<(), String> {
        let attempt = async {
            match self {
                Probe::Tcp { host, port } => {
                    TcpStream::connect((host.as_str(), *port)).await.map_err(|e| e.to_string())?;
                    Ok(())
                }
                Probe::Http { host, port, path } => http_get(host, *port, path).await,
            }
        };
        tokio::time::timeout(Duration::from_secs(2), attempt).await.map_err(|_| "timed out".to_string())?
    }
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: devloop-agent\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut filled = 0;
    while filled < 12 {
        let n = stream.read(&mut head[filled..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let line = String::from_utf8_lossy(&head[..filled]);
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_specs() {
        assert_eq!(Probe::parse("tcp:8080").unwrap(), Probe::Tcp { host: "127.0.0.1".into(), port: 8080 });
        assert_eq!(Probe::parse("tcp:db:5432").unwrap(), Probe::Tcp { host: "db".into(), port: 5432 });
        assert_eq!(
            Probe::parse("http://localhost:5000/health").unwrap(),
            Probe::Http { host: "localhost".into(), port: 5000, path: "/health".into() }
        );
        assert_eq!(Probe::parse("http://web").unwrap(), Probe::Http { host: "web".into(), port: 80, path: "/".into() });
        assert!(Probe::parse("tcp:x").is_err());
        assert!(Probe::parse("ftp://x").is_err());
    }
}
