//! The one HTTP/1.1 client of the kit: Envoy's admin interface, the bridge's health and
//! metrics server, and requests through Envoy listeners. Blocking std I/O, loopback only.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `METHOD path` with `Connection: close`; the body is read to the end and de-chunked
/// (Envoy's admin answers chunked, its direct responses with Content-Length).
pub fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    request_to_host(addr, method, path, &addr.to_string())
}

/// `GET path` with `Host: host` (a server that checks its domain name, e.g. SPIRE's OIDC
/// Discovery Provider).
pub fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> std::io::Result<HttpResponse> {
    request_to_host(addr, "GET", path, host)
}

fn request_to_host(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let (status, headers) = parse_head(&raw[..split])?;
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body).ok_or_else(|| invalid("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    request(addr, "GET", path)
}

/// `GET path` on 127.0.0.1:`port`; panics on a transport error.
pub fn get_local(port: u16, path: &str) -> HttpResponse {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// One HTTP/1.1 connection kept open across requests (to prove established connections
/// keep working).
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(KeepAlive { stream })
    }

    /// `GET /`; the status and the response headers (the body, sized by Content-Length, is
    /// read and dropped so that the next request starts clean).
    pub fn get(&mut self) -> std::io::Result<(u16, BTreeMap<String, String>)> {
        write!(self.stream, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if self.stream.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            head.push(byte[0]);
        }
        let (status, headers) = parse_head(&head[..head.len() - 4])?;
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok((status, headers))
    }
}

fn parse_head(head: &[u8]) -> std::io::Result<(u16, BTreeMap<String, String>)> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_a_body_in_several_chunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(),
            Some(&b"abcde"[..])
        );
        assert_eq!(dechunk(b"5\r\nab"), None, "a truncated chunk is an error");
    }

    #[test]
    fn head_without_a_status_is_an_error() {
        assert!(parse_head(b"garbage").is_err());
        let (status, headers) = parse_head(b"HTTP/1.1 503 Unavailable\r\nX-A: b").unwrap();
        assert_eq!((status, headers["x-a"].as_str()), (503, "b"));
    }
}
