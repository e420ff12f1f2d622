//! A small HTTP/1.1 client on hyper (one connection per request), with a reader for
//! server-sent events. Used by the loopback tests and `blockformer loadtest`.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A response whose body has not been read yet.
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: Incoming,
    buf: Vec<u8>,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The whole body as text.
    pub async fn text(mut self) -> io::Result<String> {
        let rest = (&mut self.body).collect().await.map_err(other)?.to_bytes();
        self.buf.extend_from_slice(&rest);
        String::from_utf8(self.buf).map_err(other)
    }

    /// The whole body as JSON.
    pub async fn json(self) -> io::Result<serde_json::Value> {
        let t = self.text().await?;
        serde_json::from_str(&t).map_err(|e| other(format!("{e}: {t}")))
    }

    /// The `data:` payload of the next server-sent event, or `None` at the end of the body.
    pub async fn next_event(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(p) = find(&self.buf, b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..p + 2).collect();
                let ev = String::from_utf8(ev).map_err(other)?;
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(f) => {
                    if let Ok(d) = f.map_err(other)?.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends one request on a new connection; `body` is sent as JSON.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<ClientResponse> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_vec())))
        .map_err(other)?;
    let resp = sender.send_request(req).await.map_err(other)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    Ok(ClientResponse {
        status,
        headers,
        body: resp.into_body(),
        buf: Vec::new(),
    })
}

/// `POST path` with a JSON body.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> io::Result<ClientResponse> {
    send(
        addr,
        "POST",
        path,
        headers,
        Some(body.to_string().as_bytes()),
    )
    .await
}

/// `GET path`.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<ClientResponse> {
    send(addr, "GET", path, headers, None).await
}
