//! Topic ids kept as clients first saw them, across a switch.
//!
//! A topic id (KIP-516) names one incarnation of a topic in one cluster: a cluster that holds a
//! copy (made by MSK Replicator, MirrorMaker 2 or by hand) gives it another. After a switch,
//! clients would see each of their topics under its old name with a new id. The Java client
//! takes that for a recreated topic; librdkafka (2.16 at least, its issue 4964) keeps a stale
//! entry in its metadata cache and can crash. So the proxy keeps showing the ids clients saw:
//! per block, the id shown last for each topic name ([`Shown`]); per cluster the proxy leads to
//! ([`TopicIds`], one per [`super::switch::Upstream`]), the shown id in place of the cluster's
//! own where they differ, in every response that carries ids, and the cluster's own in every
//! request. A cluster's id differs from the shown one only for a name that another cluster had
//! shown first: a topic deleted and created again on the cluster the proxy leads to gets its new
//! id, as Kafka says. Until a switch nothing differs and nothing is translated ([`Ids::mapped`]:
//! Fetch traffic is not walked for it).
//!
//! Which messages carry ids, and what the proxy does with each (the others are not offered in
//! versions with ids: rewrite.rs `without_ids`): Metadata v10+ and DescribeTopicPartitions
//! responses (names and ids: learned), Metadata v10+ and Fetch v13+ requests, Fetch v13+ responses,
//! ConsumerGroupHeartbeat requests and responses, ConsumerGroupDescribe responses.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ConsumerGroupHeartbeatRequest, FetchRequest, MetadataRequest, RequestHeader};
use kafka_protocol::protocol::{Decodable, Message};
use uuid::Uuid;

use crate::proxy::frame::{CONSUMER_GROUP_DESCRIBE, CONSUMER_GROUP_HEARTBEAT, FETCH, METADATA, encode_checked};

/// Topic names remembered per block, and per cluster: past it, a new name's id is passed as the
/// cluster has it (counted in `mskdns_proxy_topic_ids_untracked_total`). About 200 bytes each.
pub const MAX_TOPICS: usize = 65_536;

/// Requests larger than this that carry topic ids are not held to be translated: the connection
/// is closed (a Fetch request names ~40 bytes per partition: this is over 25,000 partitions).
pub const MAX_REQUEST: usize = 1 << 20;

/// Ids as a message carries them, translated one way or the other.
pub trait Ids: Sync {
    /// A response from the cluster names topic `name` (when it does) with `id`, the cluster's:
    /// `id` becomes the one clients are shown.
    fn to_client(&self, name: Option<&str>, id: &mut Uuid);
    /// A request names `id` as clients were shown it: it becomes the cluster's.
    fn to_cluster(&self, id: &mut Uuid);
    /// Whether any id differs between the two (else nothing needs translating).
    fn mapped(&self) -> bool;
}

/// No translation: the ids are the cluster's (tests, fuzzing).
pub struct Plain;

impl Ids for Plain {
    fn to_client(&self, _: Option<&str>, _: &mut Uuid) {}
    fn to_cluster(&self, _: &mut Uuid) {}
    fn mapped(&self) -> bool {
        false
    }
}

/// The id shown last for each topic name, whichever cluster it came from (per block), kept in
/// the block's `state_file` when it has one.
#[derive(Default)]
pub struct Shown {
    names: Mutex<HashMap<String, Uuid>>,
    /// Set when a name was added or its id changed, until the state file is written.
    changed: AtomicBool,
    /// Woken when `changed` is set.
    pub(super) wake: tokio::sync::Notify,
}

impl Shown {
    /// What a state file kept (its first [`MAX_TOPICS`] names whose ids parse).
    pub fn restored(names: impl IntoIterator<Item = (String, String)>) -> Self {
        let parsed = names.into_iter().filter_map(|(name, id)| Some((name, id.parse::<Uuid>().ok()?)));
        Shown { names: Mutex::new(parsed.take(MAX_TOPICS).collect()), ..Default::default() }
    }

    /// Whether any name is known.
    pub(super) fn kept(&self) -> bool {
        !self.names.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    pub(super) fn snapshot(&self) -> std::collections::BTreeMap<String, Uuid> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, id)| (n.clone(), *id)).collect()
    }

    /// Whether names changed since last asked.
    pub(super) fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    fn changed(&self) {
        if !self.changed.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    fn get(&self, name: &str) -> Option<Uuid> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied()
    }

    fn set(&self, name: &str, id: Uuid) -> bool {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shown) = names.get_mut(name) {
            if *shown != id {
                *shown = id;
                drop(names);
                self.changed();
            }
            return true;
        }
        if names.len() >= MAX_TOPICS {
            return false;
        }
        names.insert(name.to_owned(), id);
        drop(names);
        self.changed();
        true
    }
}

/// One cluster's ids next to those clients are shown.
pub struct TopicIds {
    shown: std::sync::Arc<Shown>,
    tables: Mutex<Tables>,
    /// Set when a first id is translated.
    mapped: AtomicBool,
    /// Cleared when the proxy switches away: a cluster being drained teaches no names.
    current: AtomicBool,
    label: String,
}

#[derive(Default)]
struct Tables {
    /// Each name this cluster has named since the proxy has led to it, with its id there.
    named: HashMap<String, Uuid>,
    /// The cluster's id → the one shown, and back, where they differ.
    to_client: HashMap<Uuid, Uuid>,
    to_cluster: HashMap<Uuid, Uuid>,
}

impl TopicIds {
    pub fn new(label: &str, shown: std::sync::Arc<Shown>) -> Self {
        TopicIds {
            shown,
            tables: Mutex::default(),
            mapped: AtomicBool::new(false),
            current: AtomicBool::new(true),
            label: label.to_owned(),
        }
    }

    /// The proxy switched away from this cluster.
    pub fn retire(&self) {
        self.current.store(false, Ordering::Relaxed);
    }

    /// How many ids are translated.
    pub fn translated(&self) -> usize {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).to_client.len()
    }

    fn untracked(&self) {
        metrics::counter!("mskdns_proxy_topic_ids_untracked_total", "proxy" => self.label.clone()).increment(1);
    }

    /// The id to show for `name`, which this cluster names with `id`.
    fn learn(&self, name: &str, id: Uuid) -> Uuid {
        let current = self.current.load(Ordering::Relaxed);
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let shown = match t.named.get(name) {
            Some(&before) if before == id => t.to_client.get(&id).copied().unwrap_or(id),
            // Deleted and created again on this cluster: its new id, as Kafka shows it.
            Some(_) => {
                t.named.insert(name.to_owned(), id);
                t.to_client.get(&id).copied().unwrap_or(id)
            }
            None if t.named.len() >= MAX_TOPICS => {
                self.untracked();
                return t.to_client.get(&id).copied().unwrap_or(id);
            }
            None => {
                t.named.insert(name.to_owned(), id);
                match self.shown.get(name) {
                    Some(before) if current && before != id && !t.to_cluster.contains_key(&before) => {
                        t.to_client.insert(id, before);
                        t.to_cluster.insert(before, id);
                        if !self.mapped.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                proxy = %self.label, topic = name, shown = %before, cluster = %id,
                                "a topic has another id on this cluster: clients keep being shown the one they saw"
                            );
                        }
                        before
                    }
                    _ => t.to_client.get(&id).copied().unwrap_or(id),
                }
            }
        };
        drop(t);
        if current && !self.shown.set(name, shown) {
            self.untracked();
        }
        shown
    }
}

impl Ids for TopicIds {
    fn to_client(&self, name: Option<&str>, id: &mut Uuid) {
        if id.is_nil() {
            return;
        }
        match name {
            Some(name) => *id = self.learn(name, *id),
            None if self.mapped() => {
                if let Some(shown) = self.tables.lock().unwrap_or_else(|e| e.into_inner()).to_client.get(id) {
                    *id = *shown;
                }
            }
            None => {}
        }
    }

    fn to_cluster(&self, id: &mut Uuid) {
        if id.is_nil() || !self.mapped() {
            return;
        }
        if let Some(theirs) = self.tables.lock().unwrap_or_else(|e| e.into_inner()).to_cluster.get(id) {
            *id = *theirs;
        }
    }

    fn mapped(&self) -> bool {
        self.mapped.load(Ordering::Relaxed)
    }
}

/// Whether requests of this kind carry topic ids the proxy translates.
pub fn in_request(api_key: i16, version: i16) -> bool {
    match api_key {
        FETCH => version >= 13,
        METADATA => version >= 10,
        CONSUMER_GROUP_HEARTBEAT => true,
        _ => false,
    }
}

/// Whether responses of this kind carry topic ids that only a translation changes (Metadata
/// and DescribeTopicPartitions responses are always decoded: rewrite.rs).
pub fn in_response(api_key: i16, version: i16) -> bool {
    match api_key {
        FETCH => version >= 13,
        CONSUMER_GROUP_HEARTBEAT | CONSUMER_GROUP_DESCRIBE => true,
        _ => false,
    }
}

/// A request `message` (after its size prefix), its ids translated to the cluster's: the new
/// message with its size prefix.
pub fn request(api_key: i16, version: i16, message: Bytes, ids: &dyn Ids) -> Result<BytesMut, String> {
    let api = ApiKey::try_from(api_key).map_err(|_| format!("api key {api_key} carries no topic ids"))?;
    let mut buf = message;
    let header_version = api.request_header_version(version);
    let header = RequestHeader::decode(&mut buf, header_version).map_err(|e| e.to_string())?;
    let mut out = BytesMut::with_capacity(buf.len() + 64);
    out.extend_from_slice(&[0; 4]);
    encode_checked(&header, &mut out, header_version)?;
    macro_rules! body {
        ($t:ty, $m:ident => $translate:expr) => {{
            if !(<$t>::VERSIONS.min..=<$t>::VERSIONS.max).contains(&version) {
                return Err(format!("{api:?} v{version}: version not supported by the proxy"));
            }
            let mut $m = <$t>::decode(&mut buf, version).map_err(|e| e.to_string())?;
            $translate;
            encode_checked(&$m, &mut out, version)?;
        }};
    }
    match api_key {
        FETCH => body!(FetchRequest, m => {
            m.topics.iter_mut().for_each(|t| ids.to_cluster(&mut t.topic_id));
            m.forgotten_topics_data.iter_mut().for_each(|t| ids.to_cluster(&mut t.topic_id));
        }),
        METADATA => body!(MetadataRequest, m => {
            m.topics.iter_mut().flatten().for_each(|t| ids.to_cluster(&mut t.topic_id));
        }),
        CONSUMER_GROUP_HEARTBEAT => body!(ConsumerGroupHeartbeatRequest, m => {
            m.topic_partitions.iter_mut().flatten().for_each(|t| ids.to_cluster(&mut t.topic_id));
        }),
        _ => return Err(format!("{api:?} carries no topic ids the proxy translates")),
    }
    let size = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Encodable;
    use std::sync::Arc;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn shown(ids: &TopicIds, name: &str, cluster: Uuid) -> Uuid {
        let mut x = cluster;
        ids.to_client(Some(name), &mut x);
        x
    }

    #[test]
    fn ids_stay_as_clients_first_saw_them_across_switches_and_back() {
        let names = Arc::new(Shown::default());
        let a = TopicIds::new("p", names.clone());
        assert_eq!(shown(&a, "orders", id(1)), id(1));
        assert!(!a.mapped());
        // Switch to B, where "orders" is a copy with its own id, and "fresh" exists only there.
        a.retire();
        let b = TopicIds::new("p", names.clone());
        assert_eq!(shown(&b, "orders", id(2)), id(1));
        assert_eq!(shown(&b, "orders", id(2)), id(1), "asked again");
        assert_eq!(shown(&b, "fresh", id(3)), id(3));
        assert!(b.mapped());
        let mut x = id(2);
        b.to_client(None, &mut x);
        assert_eq!(x, id(1), "a Fetch response names B's id: the client sees A's");
        let mut x = id(1);
        b.to_cluster(&mut x);
        assert_eq!(x, id(2), "a Fetch request names A's id: B gets its own");
        let mut x = id(9);
        b.to_cluster(&mut x);
        assert_eq!(x, id(9), "an id B never named passes as it is");
        // A draining connection to A still sees A's ids, and teaches nothing.
        assert_eq!(shown(&a, "orders", id(1)), id(1));
        assert_eq!(shown(&a, "late", id(7)), id(7));
        // Back to A: its ids are the ones shown, except where B showed a topic first.
        b.retire();
        let a2 = TopicIds::new("p", names.clone());
        assert_eq!(shown(&a2, "orders", id(1)), id(1));
        assert_eq!(shown(&a2, "fresh", id(4)), id(3), "created on B, copied back to A");
        assert_eq!(shown(&a2, "late", id(7)), id(7));
        assert_eq!(a2.translated(), 1);
    }

    #[test]
    fn a_topic_created_again_on_the_current_cluster_gets_its_new_id() {
        let names = Arc::new(Shown::default());
        let a = TopicIds::new("p", names.clone());
        assert_eq!(shown(&a, "t", id(1)), id(1));
        assert_eq!(shown(&a, "t", id(5)), id(5));
        a.retire();
        let b = TopicIds::new("p", names.clone());
        assert_eq!(shown(&b, "t", id(2)), id(5), "B's copy shows the id last shown");
        assert_eq!(shown(&b, "t", id(6)), id(6), "recreated on B: the new id");
    }

    #[test]
    fn names_past_the_bound_pass_as_the_cluster_has_them() {
        let names = Arc::new(Shown::default());
        let a = TopicIds::new("p", names.clone());
        for i in 0..MAX_TOPICS {
            shown(&a, &format!("t{i}"), Uuid::from_u128(i as u128 + 1));
        }
        a.retire();
        let b = TopicIds::new("p", names.clone());
        assert_eq!(shown(&b, "t0", id(200)), Uuid::from_u128(1));
        assert_eq!(shown(&b, "new", id(201)), id(201));
        assert_eq!(names.names.lock().unwrap().len(), MAX_TOPICS);
    }

    #[test]
    fn requests_are_translated_and_the_rest_of_them_kept() {
        use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
        use kafka_protocol::protocol::StrBytes;
        let names = Arc::new(Shown::default());
        shown(&TopicIds::new("p", names.clone()), "t", id(1));
        let b = TopicIds::new("p", names);
        shown(&b, "t", id(2));
        for version in [13, 15, 16, 17] {
            let req = FetchRequest::default()
                .with_max_wait_ms(500)
                .with_topics(vec![
                    FetchTopic::default()
                        .with_topic_id(id(1))
                        .with_partitions(vec![FetchPartition::default().with_partition(3).with_fetch_offset(42)]),
                ])
                .with_forgotten_topics_data(vec![
                    ForgottenTopic::default().with_topic_id(id(1)).with_partitions(vec![1]),
                ]);
            let header = RequestHeader::default()
                .with_request_api_key(FETCH)
                .with_request_api_version(version)
                .with_correlation_id(77)
                .with_client_id(Some(StrBytes::from_static_str("c")));
            let hv = ApiKey::Fetch.request_header_version(version);
            let mut msg = BytesMut::new();
            header.encode(&mut msg, hv).unwrap();
            req.encode(&mut msg, version).unwrap();
            let out = request(FETCH, version, msg.freeze(), &b).unwrap();
            assert_eq!(u32::from_be_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
            let mut body = Bytes::copy_from_slice(&out[4..]);
            assert_eq!(RequestHeader::decode(&mut body, hv).unwrap(), header);
            let got = FetchRequest::decode(&mut body, version).unwrap();
            assert_eq!(got.topics[0].topic_id, id(2));
            assert_eq!(got.forgotten_topics_data[0].topic_id, id(2));
            assert_eq!(got.topics[0].partitions[0].fetch_offset, 42);
            assert_eq!(got.max_wait_ms, 500);
        }
        assert!(request(FETCH, 13, Bytes::from_static(&[0, 1, 0, 13, 0, 0]), &b).is_err());
    }
}
