//! The responses that carry broker addresses, decoded and re-encoded with kafka-protocol so that
//! every address a client sees is `advertise_host` and a port of ours, and their topic ids as
//! clients first saw them (topic_ids.rs); ApiVersions narrowed to the versions we can decode, and
//! to versions without topic ids for the APIs whose ids the proxy does not translate. Everything
//! else is never decoded.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, ConsumerGroupDescribeResponse, ConsumerGroupHeartbeatResponse,
    DescribeClusterResponse, DescribeConfigsResponse, DescribeTopicPartitionsResponse, FetchResponse,
    FindCoordinatorResponse, MetadataResponse, ProduceResponse, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Message, StrBytes};

use super::topic_ids::Ids;
use crate::proxy::frame::{
    ALTER_SHARE_GROUP_OFFSETS, API_VERSIONS, CONSUMER_GROUP_DESCRIBE, CONSUMER_GROUP_HEARTBEAT, CREATE_TOPICS,
    DELETE_SHARE_GROUP_OFFSETS, DELETE_TOPICS, DESCRIBE_CLUSTER, DESCRIBE_CONFIGS, DESCRIBE_QUORUM,
    DESCRIBE_SHARE_GROUP_OFFSETS, DESCRIBE_TOPIC_PARTITIONS, FETCH, FIND_COORDINATOR, METADATA, OFFSET_COMMIT,
    OFFSET_FETCH, PRODUCE, SHARE_ACKNOWLEDGE, SHARE_FETCH, SHARE_GROUP_DESCRIBE, SHARE_GROUP_HEARTBEAT, encode_checked,
};

/// The port map a response is rewritten over: a snapshot of the registry's, read and never
/// changed here. A node it does not hold is left out of the rewritten response and reported in
/// [`Rewritten::nodes`]; the registry then gives it a port and the response is rewritten again
/// before it is forwarded (relay.rs).
pub trait Ports {
    /// The port clients use for node `node`, if it has one.
    fn port_of(&self, node: i32) -> Option<u16>;
}

impl Ports for std::collections::HashMap<i32, u16> {
    fn port_of(&self, node: i32) -> Option<u16> {
        self.get(&node).copied()
    }
}

/// A broker's address as the registry keeps it: `host:port`, `[v6]:port`.
pub fn upstream_addr(host: &str, port: i32) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Whether responses to this request are decoded at all.
pub fn needs_rewrite(api_key: i16, version: i16) -> bool {
    match api_key {
        METADATA | FIND_COORDINATOR | DESCRIBE_CLUSTER | API_VERSIONS | DESCRIBE_CONFIGS => true,
        // Names and topic ids: what topic_ids.rs learns from.
        DESCRIBE_TOPIC_PARTITIONS => true,
        // KIP-951: NodeEndpoints (leader hints) from Produce v10 and Fetch v16.
        PRODUCE => version >= 10,
        FETCH => version >= 16,
        _ => false,
    }
}

/// The versions we decode, for the APIs we decode.
pub fn supported(api_key: i16) -> Option<(i16, i16)> {
    let r = match api_key {
        METADATA => MetadataResponse::VERSIONS,
        FIND_COORDINATOR => FindCoordinatorResponse::VERSIONS,
        DESCRIBE_CLUSTER => DescribeClusterResponse::VERSIONS,
        PRODUCE => ProduceResponse::VERSIONS,
        FETCH => FetchResponse::VERSIONS,
        DESCRIBE_CONFIGS => DescribeConfigsResponse::VERSIONS,
        DESCRIBE_TOPIC_PARTITIONS => DescribeTopicPartitionsResponse::VERSIONS,
        // Listener endpoints from v2 on, which the proxy does not rewrite.
        DESCRIBE_QUORUM => return Some((0, 1)),
        // Share groups (KIP-932) name node endpoints in their responses, and their assignments
        // and offsets name topic ids the proxy does not translate: not offered.
        SHARE_FETCH
        | SHARE_ACKNOWLEDGE
        | SHARE_GROUP_HEARTBEAT
        | SHARE_GROUP_DESCRIBE
        | DESCRIBE_SHARE_GROUP_OFFSETS
        | ALTER_SHARE_GROUP_OFFSETS
        | DELETE_SHARE_GROUP_OFFSETS => return Some((1, 0)),
        _ => return None,
    };
    Some((r.min, r.max))
}

/// The newest version without topic ids of the APIs whose ids the proxy does not translate
/// (topic_ids.rs): a client of a cluster it switched to would name ids that cluster never had.
/// Nothing else changes in those versions: Produce v13, CreateTopics v7 (the new topic's id in
/// the answer), DeleteTopics v6 (topics by id), OffsetCommit and OffsetFetch v10.
fn without_ids(api_key: i16) -> Option<i16> {
    match api_key {
        PRODUCE => Some(12),
        CREATE_TOPICS => Some(6),
        DELETE_TOPICS => Some(5),
        OFFSET_COMMIT | OFFSET_FETCH => Some(9),
        _ => None,
    }
}

/// Requests the proxy refuses (the connection is closed): versions ApiVersions did not offer
/// whose answers would carry upstream addresses.
pub fn refused(api_key: i16, version: i16) -> bool {
    match supported(api_key) {
        Some((min, max)) if matches!(api_key, DESCRIBE_QUORUM | SHARE_FETCH | SHARE_ACKNOWLEDGE | DESCRIBE_CONFIGS) => {
            !(min..=max).contains(&version)
        }
        _ => false,
    }
}

/// Broker configs whose values are upstream addresses: masked (null and sensitive, as Kafka
/// shows secrets) in DescribeConfigs responses.
fn is_address_config(name: &str) -> bool {
    matches!(
        name,
        "listeners" | "advertised.listeners" | "controller.quorum.voters" | "controller.quorum.bootstrap.servers"
    ) || name.ends_with(".advertised.listeners")
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot decode a {api:?} v{version} response: {error}")]
    Decode { api: ApiKey, version: i16, error: String },
    #[error("cannot encode a {api:?} v{version} response: {error}")]
    Encode { api: ApiKey, version: i16, error: String },
    #[error("{api:?} v{version}: version not supported by the proxy")]
    Version { api: ApiKey, version: i16 },
    #[error("api key {0} is not one the proxy decodes")]
    UnknownApi(i16),
}

/// What a rewrite did, for metrics and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// Broker addresses replaced.
    pub addresses: usize,
    /// Brokers left out because they have no port (none was free).
    pub dropped: usize,
    /// Leader hints left out of a streamed response because the rewritten ones did not fit the
    /// broker's bytes (hints.rs).
    pub unfit: usize,
    /// Every broker the response named, with its upstream address (`host:port`): what the
    /// registry learns from (new nodes, brokers that moved, the last time each was seen).
    pub nodes: Vec<(i32, String)>,
}

/// Points one broker address at `advertise` and the port of ours for `node`; false (counted in
/// `dropped`) when it has none, and the caller leaves the broker out.
pub(super) fn swap(
    ports: &dyn Ports,
    advertise: &StrBytes,
    node: i32,
    host: &mut StrBytes,
    port: &mut i32,
    done: &mut Rewritten,
) -> bool {
    done.nodes.push((node, upstream_addr(host.as_str(), *port)));
    match ports.port_of(node) {
        Some(p) => {
            *host = advertise.clone();
            *port = i32::from(p);
            done.addresses += 1;
            true
        }
        None => {
            done.dropped += 1;
            false
        }
    }
}

/// Rewrites one response `message` (after the size prefix), its topic ids translated by `ids`.
/// `Ok(None)`: forward it unchanged.
pub fn rewrite(
    api_key: i16,
    version: i16,
    message: Bytes,
    advertise: &StrBytes,
    ports: &dyn Ports,
    ids: &dyn Ids,
) -> Result<(Option<BytesMut>, Rewritten), RewriteError> {
    let api = ApiKey::try_from(api_key).map_err(|_| RewriteError::UnknownApi(api_key))?;
    let header_version = api.response_header_version(version);
    let mut buf = message;
    let decode_error = |e: anyhow::Error| RewriteError::Decode { api, version, error: e.to_string() };
    let header = ResponseHeader::decode(&mut buf, header_version).map_err(decode_error)?;
    let mut done = Rewritten::default();
    let swap = |node: i32, host: &mut StrBytes, port: &mut i32, done: &mut Rewritten| -> bool {
        swap(ports, advertise, node, host, port, done)
    };
    macro_rules! decode {
        ($t:ty) => {{
            if !(<$t>::VERSIONS.min..=<$t>::VERSIONS.max).contains(&version) {
                return Err(RewriteError::Version { api, version });
            }
            <$t>::decode(&mut buf, version).map_err(decode_error)?
        }};
    }
    let body: EncodeBody = match api_key {
        METADATA => {
            let mut m = decode!(MetadataResponse);
            m.brokers.retain_mut(|b| swap(b.node_id.0, &mut b.host, &mut b.port, &mut done));
            m.topics.iter_mut().for_each(|t| ids.to_client(t.name.as_deref().map(|n| n.as_str()), &mut t.topic_id));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        DESCRIBE_TOPIC_PARTITIONS | CONSUMER_GROUP_HEARTBEAT | CONSUMER_GROUP_DESCRIBE => {
            translate_ids(api, version, &mut buf, ids)?
        }
        DESCRIBE_CLUSTER => {
            let mut m = decode!(DescribeClusterResponse);
            m.brokers.retain_mut(|b| swap(b.broker_id.0, &mut b.host, &mut b.port, &mut done));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        FIND_COORDINATOR => {
            let mut m = decode!(FindCoordinatorResponse);
            coordinators(&mut m, version, &mut |n, h, p| swap(n, h, p, &mut done));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        PRODUCE => {
            let mut m = decode!(ProduceResponse);
            if m.node_endpoints.is_empty() {
                return Ok((None, done));
            }
            m.node_endpoints.retain_mut(|e| swap(e.node_id.0, &mut e.host, &mut e.port, &mut done));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        FETCH => {
            let mut m = decode!(FetchResponse);
            if m.node_endpoints.is_empty() {
                return Ok((None, done));
            }
            m.node_endpoints.retain_mut(|e| swap(e.node_id.0, &mut e.host, &mut e.port, &mut done));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        DESCRIBE_CONFIGS => {
            let mut m = decode!(DescribeConfigsResponse);
            let masked = mask_address_configs(&mut m);
            if masked == 0 {
                return Ok((None, done));
            }
            done.addresses += masked;
            Box::new(move |out| encode_checked(&m, out, version))
        }
        API_VERSIONS => match api_versions(&mut buf, version) {
            Some(body) => body,
            None => return Ok((None, done)),
        },
        _ => return Ok((None, done)),
    };
    let out = framed(&header, header_version, body).map_err(|error| RewriteError::Encode { api, version, error })?;
    Ok((Some(out), done))
}

/// The responses whose topic ids alone are rewritten (topic_ids.rs).
fn translate_ids(api: ApiKey, version: i16, buf: &mut Bytes, ids: &dyn Ids) -> Result<EncodeBody, RewriteError> {
    fn decode<T: Decodable + Message>(api: ApiKey, version: i16, buf: &mut Bytes) -> Result<T, RewriteError> {
        if !(T::VERSIONS.min..=T::VERSIONS.max).contains(&version) {
            return Err(RewriteError::Version { api, version });
        }
        T::decode(buf, version).map_err(|e| RewriteError::Decode { api, version, error: e.to_string() })
    }
    Ok(match api {
        ApiKey::DescribeTopicPartitions => {
            let mut m: DescribeTopicPartitionsResponse = decode(api, version, buf)?;
            m.topics.iter_mut().for_each(|t| ids.to_client(t.name.as_deref().map(|n| n.as_str()), &mut t.topic_id));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        ApiKey::ConsumerGroupHeartbeat => {
            let mut m: ConsumerGroupHeartbeatResponse = decode(api, version, buf)?;
            let assigned = m.assignment.iter_mut().flat_map(|a| a.topic_partitions.iter_mut());
            assigned.for_each(|t| ids.to_client(None, &mut t.topic_id));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        ApiKey::ConsumerGroupDescribe => {
            let mut m: ConsumerGroupDescribeResponse = decode(api, version, buf)?;
            let members = m.groups.iter_mut().flat_map(|g| g.members.iter_mut());
            let assigned = members.flat_map(|m| [&mut m.assignment, &mut m.target_assignment]);
            assigned.flat_map(|a| a.topic_partitions.iter_mut()).for_each(|t| ids.to_client(None, &mut t.topic_id));
            Box::new(move |out| encode_checked(&m, out, version))
        }
        _ => return Err(RewriteError::UnknownApi(api as i16)),
    })
}

/// The size prefix, `header` and the body `body` encodes.
fn framed(header: &ResponseHeader, header_version: i16, body: EncodeBody) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(256);
    out.extend_from_slice(&[0; 4]);
    encode_checked(header, &mut out, header_version)?;
    body(&mut out)?;
    let size = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out)
}

/// Points each coordinator at its port of ours; one without (left out) becomes
/// COORDINATOR_NOT_AVAILABLE, so the client asks again.
fn coordinators(
    m: &mut FindCoordinatorResponse,
    version: i16,
    swap: &mut dyn FnMut(i32, &mut StrBytes, &mut i32) -> bool,
) {
    if version < 4 {
        if m.error_code == 0 && m.node_id.0 >= 0 && !swap(m.node_id.0, &mut m.host, &mut m.port) {
            coordinator_unavailable(&mut m.error_code, &mut m.node_id, &mut m.host, &mut m.port);
        }
        return;
    }
    for c in &mut m.coordinators {
        if c.error_code == 0 && c.node_id.0 >= 0 && !swap(c.node_id.0, &mut c.host, &mut c.port) {
            coordinator_unavailable(&mut c.error_code, &mut c.node_id, &mut c.host, &mut c.port);
        }
    }
}

/// Masks the values of configs that are upstream addresses; how many were masked.
fn mask_address_configs(m: &mut DescribeConfigsResponse) -> usize {
    let mut masked = 0;
    for c in m.results.iter_mut().flat_map(|r| r.configs.iter_mut()) {
        if is_address_config(&c.name) {
            c.value = None;
            c.is_sensitive = true;
            masked += 1;
        }
        for syn in c.synonyms.iter_mut().filter(|s| is_address_config(&s.name)) {
            syn.value = None;
            masked += 1;
        }
    }
    masked
}

/// ApiVersions narrowed ([`narrow`]). `None`: forward it as it is; an error answer
/// (UNSUPPORTED_VERSION to a too-new request) is v0-shaped whatever the request's version.
fn api_versions(buf: &mut Bytes, version: i16) -> Option<EncodeBody> {
    let mut m = ApiVersionsResponse::decode(buf, version).ok()?;
    if m.error_code != 0 {
        return None;
    }
    narrow(&mut m);
    Some(Box::new(move |out| encode_checked(&m, out, version)))
}

/// Narrows ApiVersions to the versions we decode, for the APIs we decode, and below topic ids
/// where the proxy does not translate them (a broker whose oldest version has ids keeps it).
fn narrow(m: &mut ApiVersionsResponse) {
    m.api_keys.retain_mut(|k| match supported(k.api_key) {
        None => true,
        Some((min, max)) => {
            k.min_version = k.min_version.max(min);
            k.max_version = k.max_version.min(max);
            k.min_version <= k.max_version
        }
    });
    for k in m.api_keys.iter_mut() {
        if let Some(max) = without_ids(k.api_key) {
            k.max_version = k.max_version.min(max).max(k.min_version);
        }
    }
}

/// Encodes the rewritten body after the header.
type EncodeBody = Box<dyn FnOnce(&mut BytesMut) -> Result<(), String>>;

/// COORDINATOR_NOT_AVAILABLE (15): the client asks again later, and sees no upstream address.
fn coordinator_unavailable(error: &mut i16, node: &mut BrokerId, host: &mut StrBytes, port: &mut i32) {
    *error = 15;
    *node = BrokerId(-1);
    *host = StrBytes::from_static_str("");
    *port = -1;
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::proxy::ports::topic_ids::Plain;
    use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    use kafka_protocol::messages::find_coordinator_response::Coordinator;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::produce_response::NodeEndpoint;
    use kafka_protocol::protocol::Encodable;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Ports handed out from 9100 in order of first sight; `limit` of them at most.
    pub(crate) struct TestPorts {
        given: Mutex<BTreeMap<i32, u16>>,
        limit: usize,
    }

    /// Unlike the registry's snapshot, hands out a port at the first lookup (the unit tests here
    /// are about the rewriting; relay.rs and tests/proxy_socket.rs go through the registry).
    impl Ports for TestPorts {
        fn port_of(&self, node: i32) -> Option<u16> {
            let mut g = self.given.lock().unwrap();
            let n = g.len();
            if let Some(e) = g.get(&node) {
                return Some(*e);
            }
            if n >= self.limit {
                return None;
            }
            g.insert(node, 9100 + n as u16);
            Some(9100 + n as u16)
        }
    }

    pub(crate) fn ports(limit: usize) -> TestPorts {
        TestPorts { given: Mutex::default(), limit }
    }

    pub(crate) fn message<T: Encodable>(api: ApiKey, version: i16, body: &T) -> Bytes {
        let mut b = BytesMut::new();
        ResponseHeader::default().with_correlation_id(41).encode(&mut b, api.response_header_version(version)).unwrap();
        body.encode(&mut b, version).unwrap();
        b.freeze()
    }

    pub(crate) fn decoded<T: Decodable>(api: ApiKey, version: i16, out: BytesMut) -> T {
        let size = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 4);
        let mut b = out.freeze().slice(4..);
        let h = ResponseHeader::decode(&mut b, api.response_header_version(version)).unwrap();
        assert_eq!(h.correlation_id, 41);
        let t = T::decode(&mut b, version).unwrap();
        assert!(b.is_empty(), "trailing bytes");
        t
    }

    pub(crate) fn adv() -> StrBytes {
        StrBytes::from_static_str("kafka-proxy.internal")
    }

    fn broker(node: i32) -> MetadataResponseBroker {
        MetadataResponseBroker::default()
            .with_node_id(BrokerId(node))
            .with_host(StrBytes::from_string(format!(
                "b{node:04}-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            )))
            .with_port(9098)
    }

    #[test]
    fn metadata_every_version_sparse_node_ids() {
        for v in 0..=13 {
            let p = ports(100);
            let m = MetadataResponse::default().with_brokers(vec![broker(1), broker(37), broker(523)]);
            let (out, done) = rewrite(METADATA, v, message(ApiKey::Metadata, v, &m), &adv(), &p, &Plain).unwrap();
            let back: MetadataResponse = decoded(ApiKey::Metadata, v, out.unwrap());
            let seen: Vec<(i32, &str, i32)> =
                back.brokers.iter().map(|b| (b.node_id.0, b.host.as_str(), b.port)).collect();
            assert_eq!(
                seen,
                [
                    (1, "kafka-proxy.internal", 9100),
                    (37, "kafka-proxy.internal", 9101),
                    (523, "kafka-proxy.internal", 9102)
                ],
                "v{v}"
            );
            assert_eq!((done.addresses, done.dropped, done.unfit), (3, 0, 0));
            // A broker that appears in a later response gets the next port; the others keep theirs.
            let m = MetadataResponse::default().with_brokers(vec![broker(523), broker(1), broker(1000)]);
            let (out, _) = rewrite(METADATA, v, message(ApiKey::Metadata, v, &m), &adv(), &p, &Plain).unwrap();
            let back: MetadataResponse = decoded(ApiKey::Metadata, v, out.unwrap());
            let ports: Vec<(i32, i32)> = back.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
            assert_eq!(ports, [(523, 9102), (1, 9100), (1000, 9103)]);
        }
    }

    #[test]
    fn a_full_port_range_leaves_brokers_out_rather_than_leaking_them() {
        let p = ports(2);
        let m = MetadataResponse::default().with_brokers(vec![broker(1), broker(37), broker(523)]);
        let (out, done) = rewrite(METADATA, 12, message(ApiKey::Metadata, 12, &m), &adv(), &p, &Plain).unwrap();
        let back: MetadataResponse = decoded(ApiKey::Metadata, 12, out.unwrap());
        assert_eq!(back.brokers.len(), 2);
        assert!(back.brokers.iter().all(|b| b.host.as_str() == "kafka-proxy.internal"));
        assert_eq!((done.addresses, done.dropped, done.unfit), (2, 1, 0));
    }

    #[test]
    fn find_coordinator_every_version_and_batched_keys() {
        for v in 0..=6 {
            let p = ports(1);
            let upstream = StrBytes::from_static_str("b0037-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com");
            let m = if v < 4 {
                FindCoordinatorResponse::default()
                    .with_node_id(BrokerId(37))
                    .with_host(upstream.clone())
                    .with_port(9098)
            } else {
                let c = |k: &'static str, n: i32| {
                    Coordinator::default()
                        .with_key(StrBytes::from_static_str(k))
                        .with_node_id(BrokerId(n))
                        .with_host(upstream.clone())
                        .with_port(9098)
                };
                FindCoordinatorResponse::default().with_coordinators(vec![c("g1", 37), c("g2", 523)])
            };
            let (out, _) =
                rewrite(FIND_COORDINATOR, v, message(ApiKey::FindCoordinator, v, &m), &adv(), &p, &Plain).unwrap();
            let back: FindCoordinatorResponse = decoded(ApiKey::FindCoordinator, v, out.unwrap());
            if v < 4 {
                assert_eq!((back.host.as_str(), back.port, back.error_code), ("kafka-proxy.internal", 9100, 0));
            } else {
                // g2's node gets no port (the range holds one): COORDINATOR_NOT_AVAILABLE, no address.
                let seen: Vec<(&str, &str, i32, i16)> =
                    back.coordinators.iter().map(|c| (c.key.as_str(), c.host.as_str(), c.port, c.error_code)).collect();
                assert_eq!(seen, [("g1", "kafka-proxy.internal", 9100, 0), ("g2", "", -1, 15)]);
            }
        }
    }

    #[test]
    fn describe_cluster_every_version() {
        for v in 0..=2 {
            let p = ports(10);
            let b = |n: i32| {
                DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(n))
                    .with_host(StrBytes::from_static_str("10.0.0.5"))
                    .with_port(9094)
            };
            let m = DescribeClusterResponse::default().with_brokers(vec![b(1), b(37)]);
            let (out, _) =
                rewrite(DESCRIBE_CLUSTER, v, message(ApiKey::DescribeCluster, v, &m), &adv(), &p, &Plain).unwrap();
            let back: DescribeClusterResponse = decoded(ApiKey::DescribeCluster, v, out.unwrap());
            let seen: Vec<(&str, i32)> = back.brokers.iter().map(|b| (b.host.as_str(), b.port)).collect();
            assert_eq!(seen, [("kafka-proxy.internal", 9100), ("kafka-proxy.internal", 9101)]);
        }
    }

    #[test]
    fn node_endpoints_in_produce_responses_are_rewritten_and_absent_ones_pass_through() {
        let p = ports(10);
        let e = NodeEndpoint::default()
            .with_node_id(BrokerId(523))
            .with_host(StrBytes::from_static_str("b0523-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"))
            .with_port(9098);
        let m = ProduceResponse::default().with_node_endpoints(vec![e]);
        let (out, done) = rewrite(PRODUCE, 11, message(ApiKey::Produce, 11, &m), &adv(), &p, &Plain).unwrap();
        let back: ProduceResponse = decoded(ApiKey::Produce, 11, out.unwrap());
        assert_eq!(back.node_endpoints[0].host.as_str(), "kafka-proxy.internal");
        assert_eq!(back.node_endpoints[0].port, 9100);
        assert_eq!(done.addresses, 1);
        let plain = ProduceResponse::default();
        let (out, _) = rewrite(PRODUCE, 11, message(ApiKey::Produce, 11, &plain), &adv(), &p, &Plain).unwrap();
        assert!(out.is_none());
    }

    #[test]
    fn api_versions_are_narrowed_to_what_the_proxy_decodes_and_below_untranslated_topic_ids() {
        let offered = [
            (0, 0, 99),
            (3, 0, 99),
            (10, 0, 6),
            (19, 0, 7),
            (20, 0, 6),
            (8, 0, 10),
            (9, 10, 10),
            (68, 0, 1),
            (75, 0, 0),
            (76, 1, 1),
            (90, 0, 0),
        ];
        // Produce v13, CreateTopics v7, DeleteTopics v6, OffsetCommit v10 carry ids the proxy does
        // not translate; a broker that offers only such versions keeps them; share groups go.
        let want = [(0, 3, 12), (3, 0, 13), (10, 0, 6), (19, 0, 6), (20, 0, 5), (8, 0, 9), (9, 10, 10), (68, 0, 1)];
        assert_eq!(narrowed(&offered), [&want[..], &[(75, 0, 0)]].concat());
    }

    /// What clients are offered of `offered` (api key, min, max).
    fn narrowed(offered: &[(i16, i16, i16)]) -> Vec<(i16, i16, i16)> {
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        let k = |&(key, min, max): &(i16, i16, i16)| {
            ApiVersion::default().with_api_key(key).with_min_version(min).with_max_version(max)
        };
        let m = ApiVersionsResponse::default().with_api_keys(offered.iter().map(k).collect());
        let (out, _) =
            rewrite(API_VERSIONS, 3, message(ApiKey::ApiVersions, 3, &m), &adv(), &ports(1), &Plain).unwrap();
        let back: ApiVersionsResponse = decoded(ApiKey::ApiVersions, 3, out.unwrap());
        back.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect()
    }

    #[test]
    fn endpoints_the_proxy_cannot_rewrite_are_never_offered_and_listener_configs_are_masked() {
        use kafka_protocol::messages::describe_configs_response::{
            DescribeConfigsResourceResult, DescribeConfigsResult,
        };
        let seen = narrowed(&[(32, 0, 4), (55, 0, 2), (78, 0, 1), (79, 0, 1), (12, 0, 4)]);
        assert_eq!(seen, [(32, 1, 4), (55, 0, 1), (12, 0, 4)]);
        assert!(refused(DESCRIBE_QUORUM, 2) && !refused(DESCRIBE_QUORUM, 1));
        assert!(refused(SHARE_FETCH, 0) && refused(SHARE_ACKNOWLEDGE, 1) && refused(DESCRIBE_CONFIGS, 0));
        assert!(!refused(DESCRIBE_CONFIGS, 4) && !refused(METADATA, 12));

        let cfg = |name: &str, value: &str| {
            DescribeConfigsResourceResult::default()
                .with_name(StrBytes::from_string(name.into()))
                .with_value(Some(StrBytes::from_string(value.into())))
        };
        let m =
            DescribeConfigsResponse::default().with_results(vec![DescribeConfigsResult::default().with_configs(vec![
                cfg("advertised.listeners", "CLIENT_IAM://b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com:9098"),
                cfg("listeners", "CLIENT_IAM://10.0.0.5:9098"),
                cfg("log.retention.ms", "604800000"),
            ])]);
        for v in 1..=4 {
            let (out, done) =
                rewrite(DESCRIBE_CONFIGS, v, message(ApiKey::DescribeConfigs, v, &m), &adv(), &ports(1), &Plain)
                    .unwrap();
            assert_eq!(done.addresses, 2);
            let back: DescribeConfigsResponse = decoded(ApiKey::DescribeConfigs, v, out.unwrap());
            let c = &back.results[0].configs;
            assert!(c[0].value.is_none() && c[0].is_sensitive && c[1].value.is_none());
            assert_eq!(c[2].value.as_deref(), Some("604800000"));
        }
    }

    #[test]
    fn a_message_that_would_not_encode_back_is_an_error() {
        // FindCoordinator v5 whose top-level tagged field is numbered 2^32 - 1 (found by the
        // kafka_frame fuzz target): kafka-protocol decodes it as tag -1 and encodes it as a
        // count with no field after it.
        let mut msg = vec![0, 0, 0, 0, 0]; // correlation id 0, no header tags
        msg.extend_from_slice(&[0, 0, 0, 0, 1, 1]); // throttle 0, no coordinators, one tag:
        msg.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 0]); // number 2^32-1, 1 byte
        let r = rewrite(FIND_COORDINATOR, 5, Bytes::from(msg), &adv(), &ports(10), &Plain);
        assert!(matches!(r, Err(RewriteError::Encode { .. })), "{r:?}");
        // The same in the response header's tagged fields.
        let mut msg = vec![0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 0];
        msg.extend_from_slice(&[0, 0, 0, 0, 1, 0]);
        let r = rewrite(FIND_COORDINATOR, 5, Bytes::from(msg), &adv(), &ports(10), &Plain);
        assert!(matches!(r, Err(RewriteError::Encode { .. })), "{r:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let p = ports(10);
        for api in [METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER, PRODUCE, FETCH] {
            for v in [0, 4, 12] {
                let _ = rewrite(api, v, Bytes::from_static(&[0, 0, 0, 41, 0xff, 0xff, 0xff]), &adv(), &p, &Plain);
            }
        }
    }
}
