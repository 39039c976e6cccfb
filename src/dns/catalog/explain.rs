//! `mskdns explain`: which view, cluster and target answer a name, and why, in words.

use std::net::IpAddr;

use super::super::wire;
use super::{Catalog, Target, suffix_offset};
use crate::config::UnknownClusters;
use crate::names;

impl Catalog {
    /// Which view, cluster and target answer `name` for a client, and why.
    pub fn explain(&self, name: &str, client: IpAddr, listener: Option<usize>) -> String {
        let mut out = String::new();
        let Some(lc) = wire::name_to_wire(name) else { return format!("{name}: not a DNS name\n") };
        let fqdn = wire::wire_to_string(&lc);
        out += &format!("name:    {fqdn}\n");
        let (key, what) = if let Some(m) = names::match_serverless(&lc) {
            let role = match m.role {
                names::Role::Bootstrap => "bootstrap name".to_string(),
                names::Role::Broker(b) => format!("broker b{b}"),
            };
            (m.key.clone(), format!("MSK Serverless {role} of cluster {}", names::describe_serverless_key(&lc[m.key])))
        } else if let Some(m) = names::match_provisioned(&lc) {
            (
                m.key.clone(),
                format!("MSK provisioned broker b-{} of cluster {}", m.broker, wire::wire_to_string(&lc[m.key])),
            )
        } else {
            if let Some(z) = self.zones.iter().find(|z| suffix_offset(&lc, &z.origin).is_some()) {
                out += &format!("answer:  from the zone file for {}\n", wire::wire_to_string(&z.origin));
            } else {
                out +=
                    &format!("answer:  not an MSK name: forwarded to {:?} (cached)\n", self.default_forwarder.addrs());
            }
            return out;
        };
        out += &format!("matched: {what}\n");
        let listener_view = listener.and_then(|l| self.by_listener.get(l).copied()).filter(|v| *v != 0);
        let view = match listener_view {
            Some(v) => &self.views[v],
            None => self.view(usize::MAX, client),
        };
        let reason = if listener_view.is_some() { "chosen by the listener" } else { "chosen by the client address" };
        if view.name == "default" {
            out += &format!("view:    default ({})\n", view.selector);
        } else {
            out += &format!("view:    {} ({reason}; it is selected by {})\n", view.name, view.selector);
        }
        let Some(c) = view.clusters.get(&lc[key]) else {
            let fate = match self.unknown {
                UnknownClusters::Forward => format!("forwarded to {:?}", self.default_forwarder.addrs()),
                UnknownClusters::Nxdomain => "answered NXDOMAIN (dns.unknown_clusters = \"nxdomain\")".into(),
            };
            out += &format!("cluster: not configured in this view: {fate}\n");
            return out;
        };
        out += &format!("cluster: {} (configured at {}), ttl {}\n", c.label, c.origin, c.ttl);
        let broker = names::match_provisioned(&lc).and_then(|m| c.brokers.get(&m.broker.value));
        let target = match (broker, &c.target) {
            (Some(a), _) => format!("this broker's own addresses: {}", a.describe()),
            (None, Target::Addresses(a)) => format!("addresses {}", a.describe()),
            (None, Target::Proxy(a)) => format!("the Kafka proxy at {}", a.describe()),
            (None, Target::Forward(f)) => format!("forwarded to the cluster's own resolvers {:?} (cached)", f.addrs()),
            (None, Target::Endpoint(e)) => {
                let az = view.az.load_full().map(|a| a.join("/"));
                let now = match e.get() {
                    Some(a) => a.iter().map(|x| format!("{} ({})", x.ip, x.az)).collect::<Vec<_>>().join(", "),
                    None => "read from EC2 at run time".into(),
                };
                format!(
                    "VPC endpoint {}: {now}; AZ affinity {:?}{}",
                    e.id,
                    view.affinity,
                    az.map(|a| format!(" for clients in {a}")).unwrap_or_default()
                )
            }
        };
        out += &format!("target:  {target}\n");
        out
    }
}
