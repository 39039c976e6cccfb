//! The S3 calls of the fleet snapshot: a conditional GET that a 304 answers for nothing, a GET
//! bounded in bytes, and a conditional PUT (If-Match / If-None-Match) so that two publishers
//! never overwrite what the other wrote without reading it first.

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

use crate::config::parse_s3_url;
use crate::discovery::driver::{ApiError, api_error};
use crate::discovery::{AWS_CALL_TIMEOUT, AWS_READ_TIMEOUT};

/// An object's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    pub key: String,
}

impl Location {
    pub fn parse(url: &str) -> Result<Location, String> {
        let (bucket, key) = parse_s3_url(url)?;
        Ok(Location { bucket, key })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The S3 client with the SDK's default chain (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials),
/// path-style on request, bounded in time, and no request checksums beyond what S3 requires
/// (the document is small and written whole; S3-compatible stores differ in what they accept).
pub async fn client(path_style: bool) -> Client {
    let base = crate::discovery::aws_config().await;
    let conf = aws_sdk_s3::config::Builder::from(&base)
        .force_path_style(path_style)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

/// What a GET found.
#[derive(Debug)]
pub enum Fetched {
    /// The object is still the one with the ETag asked about.
    NotModified,
    Object {
        etag: Option<String>,
        bytes: Vec<u8>,
    },
    /// Larger than the cap: not read (or not to its end).
    TooLarge {
        bytes: u64,
        etag: Option<String>,
    },
    /// There is no such object (or bucket).
    Absent,
}

/// GETs the object, `If-None-Match: etag` when given; reads at most `max` bytes.
pub async fn get(client: &Client, at: &Location, etag: Option<&str>, max: u64) -> Result<Fetched, ApiError> {
    let sent = client.get_object().bucket(&at.bucket).key(&at.key).set_if_none_match(etag.map(str::to_owned)).send();
    let out = match sent.await {
        Ok(out) => out,
        Err(e) => {
            return match e.raw_response().map(|r| r.status().as_u16()) {
                Some(304) => Ok(Fetched::NotModified),
                Some(404) => Ok(Fetched::Absent),
                _ => Err(api_error("GetObject", e)),
            };
        }
    };
    let announced = out.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    let etag = out.e_tag().map(str::to_owned);
    if announced > max {
        return Ok(Fetched::TooLarge { bytes: announced, etag });
    }
    let mut body: ByteStream = out.body;
    let mut bytes = Vec::with_capacity(announced.min(max) as usize);
    // The SDK's timeouts end when the headers arrive: the body is bounded here, per read and whole.
    let deadline = tokio::time::Instant::now() + AWS_CALL_TIMEOUT;
    let stalled =
        |what: &str| ApiError { operation: "GetObject", kind: "timeout", message: format!("the body {what}") };
    loop {
        let next = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + AWS_READ_TIMEOUT), body.next());
        let Some(chunk) = next.await.map_err(|_| stalled("stalled or took too long"))? else { break };
        let chunk = chunk.map_err(|e| ApiError { operation: "GetObject", kind: "response", message: e.to_string() })?;
        if (bytes.len() + chunk.len()) as u64 > max {
            return Ok(Fetched::TooLarge { bytes: (bytes.len() + chunk.len()) as u64, etag });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched::Object { etag, bytes })
}

/// The condition a PUT is made on.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// No object yet (`If-None-Match: *`).
    Absent,
    /// The object is still the one with this ETag (`If-Match`).
    Is(String),
}

#[derive(Debug)]
pub enum PutFailed {
    /// Someone else wrote first (412, or 409 for a conditional write racing another).
    Conflict,
    Api(ApiError),
}

/// PUTs `body` on condition `expect`; the new ETag.
pub async fn put(client: &Client, at: &Location, body: Vec<u8>, expect: &Expect) -> Result<String, PutFailed> {
    let mut req = client
        .put_object()
        .bucket(&at.bucket)
        .key(&at.key)
        .content_type("application/json")
        .body(ByteStream::from(body));
    req = match expect {
        Expect::Absent => req.if_none_match("*"),
        Expect::Is(etag) => req.if_match(etag),
    };
    match req.send().await {
        Ok(out) => Ok(out.e_tag().unwrap_or_default().to_owned()),
        Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(412 | 409) => Err(PutFailed::Conflict),
            _ => Err(PutFailed::Api(api_error("PutObject", e))),
        },
    }
}
