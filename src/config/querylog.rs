//! `[query_log]`: who asked what and what they got, as dnstap or Route 53-style JSON lines.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueryLogConfig {
    pub format: QueryLogFormat,
    /// A file; `unix:/path` (dnstap only: a Frame Streams collector's socket); `-` stdout.
    pub path: String,
    /// The fraction of queries logged (all of a query's messages or none).
    pub sample: f64,
    /// Records waiting for the writer, in bytes; past it a record is dropped and counted.
    pub max_queue_bytes: usize,
    /// A file is rotated past this size (`path.1`, `path.2`, …); 0: never.
    pub max_file_bytes: u64,
    /// Rotated files kept.
    pub keep_files: u32,
    /// dnstap: which messages are written.
    pub messages: Vec<DnstapMessage>,
    /// dnstap's `identity`; default: the host name.
    pub identity: Option<String>,
    /// JSON: the Route 53 fields, when the instance metadata does not give them (or to override).
    pub account_id: Option<String>,
    pub region: Option<String>,
    pub vpc_id: Option<String>,
    pub instance_id: Option<String>,
    /// JSON: read `account_id`, `region`, `vpc_id` and the instance id from the instance metadata
    /// service (IMDSv2, 1 s) at start.
    pub instance_metadata: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueryLogFormat {
    Dnstap,
    Json,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DnstapMessage {
    ClientQuery,
    ClientResponse,
    ForwarderQuery,
    ForwarderResponse,
}

impl Default for QueryLogConfig {
    fn default() -> Self {
        QueryLogConfig {
            format: QueryLogFormat::Dnstap,
            path: "/var/log/mskdns/queries.tap".into(),
            sample: 1.0,
            max_queue_bytes: 4 << 20,
            max_file_bytes: 100 << 20,
            keep_files: 5,
            messages: vec![
                DnstapMessage::ClientQuery,
                DnstapMessage::ClientResponse,
                DnstapMessage::ForwarderQuery,
                DnstapMessage::ForwarderResponse,
            ],
            identity: None,
            account_id: None,
            region: None,
            vpc_id: None,
            instance_id: None,
            instance_metadata: true,
        }
    }
}

impl QueryLogConfig {
    /// The collector's socket, for `path = "unix:/…"`.
    pub fn socket(&self) -> Option<&str> {
        self.path.strip_prefix("unix:")
    }
}

pub(super) fn validate_query_log(q: &QueryLogConfig) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&q.sample) {
        return Err(ConfigError::invalid("query_log.sample", "must be between 0 and 1"));
    }
    if q.path.is_empty() || q.socket().is_some_and(str::is_empty) {
        return Err(ConfigError::invalid("query_log.path", "is empty"));
    }
    if q.socket().is_some() && q.format == QueryLogFormat::Json {
        return Err(ConfigError::invalid("query_log.path", "a unix socket takes dnstap (Frame Streams), not json"));
    }
    if q.max_queue_bytes < 64 << 10 {
        return Err(ConfigError::invalid("query_log.max_queue_bytes", "must be at least 65536"));
    }
    if q.keep_files == 0 && q.max_file_bytes > 0 {
        return Err(ConfigError::invalid("query_log.keep_files", "must be at least 1 when max_file_bytes is set"));
    }
    Ok(())
}
