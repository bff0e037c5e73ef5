//! A small HTTP/1.1 client for ingest: one keep-alive connection, reopened when the
//! server closes it. Plain `http://` (put TLS in front with a proxy when needed).

use bytes::Bytes;
use clisonix_ingest_protocol::json::JsonFrame;
use clisonix_ingest_protocol::{binary, BatchAnswer};
use clisonix_schemas::Frame;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the URL {0:?} is not http://host:port[/path]")]
    Url(String),
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the request failed: {0}")]
    Request(#[from] hyper::Error),
    #[error("building the request failed: {0}")]
    Build(#[from] hyper::http::Error),
}

/// An answer: status, headers and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The batch answer of `POST /v1/frames`, when the body is one.
    pub fn batch(&self) -> Option<BatchAnswer> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `Retry-After`, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// How frames are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Binary,
}

impl Format {
    pub fn body(self, frames: &[Frame]) -> (&'static str, Vec<u8>) {
        match self {
            Format::Binary => (binary::CONTENT_TYPE, binary::encode_frames(frames)),
            Format::Json => {
                let list: Vec<JsonFrame> = frames.iter().map(JsonFrame::from_frame).collect();
                (
                    "application/json",
                    serde_json::to_vec(&list).expect("frames serialise"),
                )
            }
        }
    }
}

/// `http://host:port` → `host:port`.
pub fn authority(url: &str) -> Result<String, HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::Url(url.to_owned()))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(HttpError::Url(url.to_owned()));
    }
    Ok(host.to_owned())
}

#[derive(Debug)]
pub struct Client {
    authority: String,
    key: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(url: &str, key: &str) -> Result<Client, HttpError> {
        Ok(Client {
            authority: authority(url)?,
            key: key.to_owned(),
            sender: None,
        })
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, HttpError> {
        let usable = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if !usable {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|source| HttpError::Connect {
                    addr: self.authority.clone(),
                    source,
                })?;
            stream.set_nodelay(true).ok();
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected");
        sender.ready().await?;
        Ok(sender)
    }

    /// Sends a request with the device key; `key` overrides it (`Some("")`: none).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        key: Option<&str>,
    ) -> Result<Answer, HttpError> {
        self.send_with(method, path, content_type, body, key, &[])
            .await
    }

    /// As [`Client::send`], with more request headers.
    pub async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, HttpError> {
        let key = key.unwrap_or(&self.key).to_owned();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !key.is_empty() {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let sender = self.sender().await?;
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        // The server closes this connection (it refused an upload before reading all
        // of it, say): the next request goes on a new one.
        let closing = headers
            .get_all("connection")
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("close")));
        if closing {
            self.sender = None;
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// `POST /v1/frames` with `frames` in `format`.
    pub async fn post_frames(
        &mut self,
        frames: &[Frame],
        format: Format,
    ) -> Result<Answer, HttpError> {
        let (ct, body) = format.body(frames);
        self.send("POST", "/v1/frames", Some(ct), body, None).await
    }

    /// `POST path` with a raw body.
    pub async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Answer, HttpError> {
        self.send("POST", path, Some(content_type), body, None)
            .await
    }

    pub async fn get(&mut self, path: &str) -> Result<Answer, HttpError> {
        self.send("GET", path, None, Vec::new(), None).await
    }
}
