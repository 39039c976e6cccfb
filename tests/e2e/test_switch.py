"""The live cluster switch of the ports-mode proxy: two Tansu brokers are clusters A and B (the
topic created on both, the consumer group's offsets set on B as replication would); real clients
(a confluent-kafka producer, a kafka-python producer, a confluent-kafka consumer group) run
through the proxy while a reload switches it from A to B and back. Asserted on what the clients and
the brokers see: every confirmed message is in A (before) or B (after), in one of them only; no
delivery failed and no non-retriable error reached the application; the consumer goes on reading on
B; A takes no more writes once its connections are gone; a client that connects right after the
reload lands on B."""
import json
import signal
import socket
import struct
import threading
import time
import uuid

from conftest import free_port, wait_for
from test_proxy import ADVERTISE, end, port_range, spawn, tansu_binary

RATE = 50  # messages per second per producer


class NamedTansu:
    """A Tansu broker whose cluster id is its own."""

    def __init__(self, tmp_path, name):
        self.name = name
        self.port = free_port()
        self.log = open(tmp_path / f"tansu-{name}.log", "w")
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [tansu_binary(), "broker", "--cluster-id", f"cluster-{name}", "--listener-url", url,
                "--advertised-listener-url", url]
        self.proc = spawn(argv, self.log, self.port, f"tansu {name}")
        self.boot = f"127.0.0.1:{self.port}"

    def values(self, topic):
        """Every record in the topic (read straight from this broker) as (value, mirrored), and the
        end offsets."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.boot, "group.id": f"check-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False})
        parts = [TopicPartition(topic, p) for p in range(2)]
        ends = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        c.assign([TopicPartition(topic, p, 0) for p in range(2)])
        got = []
        seen = [0, 0]  # per partition: the next offset wanted
        deadline = time.time() + 30
        while any(seen[p] < ends[p] for p in range(2)) and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error() or m.offset() >= ends[m.partition()]:
                continue
            seen[m.partition()] = m.offset() + 1
            got.append((m.value().decode(), any(k == "mirrored" for k, _ in m.headers() or [])))
        c.close()
        return got, ends

    def direct(self, topic):
        """The values clients wrote here themselves (not copied by the mirror)."""
        return {v for v, mirrored in self.values(topic)[0] if not mirrored}

    def stop(self):
        end(self.proc)


class Mirror:
    """Replication as MirrorMaker 2 or MSK Replicator does it between the two clusters, both ways
    (for the switch and the switch back): every record a client wrote to one is copied to the other,
    in the same partition, marked with a `mirrored` header (the copies are not copied back). The
    consumer's position then means the same on both, as offset translation makes it mean."""

    def __init__(self, src, dst, topic):
        self.src, self.dst, self.topic = src, dst, topic
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        from confluent_kafka import Consumer, Producer, TopicPartition

        c = Consumer({"bootstrap.servers": self.src.boot, "group.id": f"mirror-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(self.topic, p, 0) for p in range(2)])
        p = Producer({"bootstrap.servers": self.dst.boot, "acks": "all", "linger.ms": 2})
        while not self.stop.is_set():
            m = c.poll(0.1)
            if m is None or m.error() or any(k == "mirrored" for k, _ in m.headers() or []):
                p.poll(0)
                continue
            p.produce(self.topic, value=m.value(), partition=m.partition(), headers=[("mirrored", b"1")])
            p.poll(0)
        p.flush(10)
        c.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)


def config(a_or_b, first, last):
    return f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:0"

[reload]
poll_secs = 0

[[proxies]]
listen = "{ADVERTISE}:0"
upstream = "{a_or_b.boot}"
advertise_host = "{ADVERTISE}"
broker_ports = "{first}-{last}"
upstream_tls = false
switch_drain_secs = 10
"""


# librdkafka's transient states: a broker connection lost, all of them lost for a moment.
TRANSIENT = {"_TRANSPORT", "_ALL_BROKERS_DOWN"}


class Clients:
    """The application side: two producers and a consumer group member, each in its thread,
    recording what they were told (delivered, failed, errors) and what they read."""

    def __init__(self, boot, topic, group):
        self.boot, self.topic, self.group = boot, topic, group
        self.stop = threading.Event()
        self.confirmed = []  # values whose delivery was confirmed
        self.failed = []
        self.errors = []  # errors surfaced to the application (error_cb, poll)
        self.read = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.confluent, self.python, self.consumer)]
        for t in self.threads:
            t.start()

    def note_error(self, where, err):
        with self.lock:
            self.errors.append((where, err.name() if hasattr(err, "name") else str(err), str(err)))

    def confluent(self):
        from confluent_kafka import Producer

        def report(err, msg):
            with self.lock:
                (self.failed if err else self.confirmed).append(msg.value().decode() if not err else (msg.value().decode(), str(err)))

        p = Producer({"bootstrap.servers": self.boot, "enable.idempotence": False, "acks": "all", "linger.ms": 5,
                      "message.timeout.ms": 60000, "reconnect.backoff.max.ms": 500,
                      "error_cb": lambda e: self.note_error("confluent producer", e)})
        n = 0
        while not self.stop.is_set():
            p.produce(self.topic, value=f"c-{n:06d}".encode(), callback=report)
            n += 1
            p.poll(1 / RATE)
        p.flush(60)

    def python(self):
        from kafka import KafkaProducer

        p = KafkaProducer(bootstrap_servers=self.boot, acks="all", enable_idempotence=False, linger_ms=5,
                          retries=100, request_timeout_ms=30000, reconnect_backoff_max_ms=500)
        n = 0
        while not self.stop.is_set():
            value = f"p-{n:06d}"
            fut = p.send(self.topic, value=value.encode())
            fut.add_callback(lambda _md, v=value: self.confirmed.append(v))
            fut.add_errback(lambda e, v=value: self.failed.append((v, repr(e))))
            n += 1
            time.sleep(1 / RATE)
        p.flush(60)
        p.close(10)

    def consumer(self):
        from confluent_kafka import Consumer

        # A short rebalance timeout: Tansu holds a JoinGroup from a member id it does not know (the
        # old cluster's) until the rebalance timeout, where Kafka answers UNKNOWN_MEMBER_ID at once.
        c = Consumer({"bootstrap.servers": self.boot, "group.id": self.group, "auto.offset.reset": "earliest",
                      "auto.commit.interval.ms": 500, "reconnect.backoff.max.ms": 500,
                      "max.poll.interval.ms": 10000, "session.timeout.ms": 6000,
                      "error_cb": lambda e: self.note_error("consumer", e)})
        c.subscribe([self.topic])
        while not self.stop.is_set() or time.time() < self.drain_until:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error():
                self.note_error("consumer poll", m.error())
                continue
            with self.lock:
                self.read.append(m.value().decode())
        c.close()

    drain_until = 0.0

    def finish(self, consume_secs=15):
        self.drain_until = time.time() + consume_secs
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def unexpected_errors(self):
        return [e for e in self.errors if e[1] not in TRANSIENT]


def switch(d, text):
    d.config.write_text(text)
    d.proc.send_signal(signal.SIGHUP)


def topic_id(boot, topic):
    """The topic's id as a client of `boot` is told it (librdkafka asks with Metadata v10+)."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": boot})
    got = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout=10).topic_id
    bits = ((got.get_most_significant_bits() % 2**64) << 64) | (got.get_least_significant_bits() % 2**64)
    return str(uuid.UUID(int=bits))


def upstream_connections(d, cluster):
    return d.metric("mskdns_proxy_upstream_connections", upstream=cluster.boot)


def test_clients_move_between_clusters_without_a_restart(daemon, tmp_path):
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    a, b = NamedTansu(tmp_path, "a"), NamedTansu(tmp_path, "b")
    try:
        topic, group = f"orders-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
        for cluster in (a, b):
            admin = AdminClient({"bootstrap.servers": cluster.boot})
            admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
        # The group's offsets on B, as replication would have set them (B holds nothing yet), and
        # the records replicated both ways from now on.
        preset = Consumer({"bootstrap.servers": b.boot, "group.id": group, "enable.auto.commit": False})
        preset.commit(offsets=[TopicPartition(topic, p, 0) for p in range(2)], asynchronous=False)
        preset.close()
        mirrors = [Mirror(a, b, topic), Mirror(b, a, topic)]

        first, last = port_range()
        d = daemon(config(a, first, last))
        boot = "%s:%d" % d.proxies[0]
        clients = Clients(boot, topic, group)
        assert wait_for(lambda: len(clients.confirmed) > 100 and len(clients.read) > 50, timeout=30), (
            len(clients.confirmed), len(clients.read), clients.errors, d.log_text()[-2000:])
        assert wait_for(lambda: upstream_connections(d, a) >= 3, timeout=10)
        # The topic has another id on B (each cluster created its own), and clients see A's.
        seen_id = topic_id(boot, topic)
        assert seen_id == topic_id(a.boot, topic) != topic_id(b.boot, topic)

        # Switch to B.
        switched = time.time()
        switch(d, config(b, first, last))
        assert wait_for(lambda: "switching clusters" in d.log_text(), timeout=10), d.log_text()[-2000:]
        # A client connecting right after the reload lands on B.
        late = AdminClient({"bootstrap.servers": boot})
        assert late.list_topics(timeout=10).cluster_id == "cluster-b"
        # The topic keeps the id clients first saw (librdkafka can crash on a known topic whose
        # id changed: its issue 4964), and it is B's copy they reach.
        assert topic_id(boot, topic) == seen_id
        assert "a topic has another id on this cluster" in d.log_text()
        # Within 60 s every client connection is on B; A's count (by upstream) reaches 0.
        assert wait_for(lambda: upstream_connections(d, a) == 0 and upstream_connections(d, b) >= 3, timeout=60), (
            upstream_connections(d, a), upstream_connections(d, b))
        took = time.time() - switched
        assert took < 60, took
        assert wait_for(lambda: "switch drained" in d.log_text(), timeout=15)
        assert d.metric("mskdns_proxy_switch_closed_total", how="cut") == 0
        a_then = a.direct(topic)
        read_then = len(clients.read)
        count_at_switch = len(clients.confirmed)
        # The consumer rejoins its group on B and reads what producers now write there.
        assert wait_for(lambda: any(v not in a_then for v in clients.read[read_then:]), timeout=60), clients.errors
        assert wait_for(lambda: len(clients.confirmed) > count_at_switch + 300, timeout=30), clients.errors
        # A takes no more writes from clients (only the mirror's copies).
        a_now = a.direct(topic)
        assert a_now == a_then, sorted(a_now - a_then)[:20]
        status, body = d.http("/readyz")
        assert status == 200, body
        assert "mskdns_proxy_client_connections" in d.http("/metrics")[1]

        # And back to A: the same operation.
        switch(d, config(a, first, last))
        assert wait_for(lambda: upstream_connections(d, b) == 0 and upstream_connections(d, a) >= 3, timeout=60), (
            upstream_connections(d, a), upstream_connections(d, b))
        assert wait_for(lambda: d.log_text().count("switch drained") == 2, timeout=15)
        assert topic_id(boot, topic) == seen_id
        count_back = len(clients.confirmed)
        # Everything confirmed from now on was written to A; the consumer reads it there.
        assert wait_for(lambda: len(set(clients.confirmed[count_back:]) & set(clients.read)) > 100, timeout=60), (
            clients.errors)
        clients.finish()
        for m in mirrors:
            m.close()

        assert clients.failed == [], clients.failed[:10]
        assert clients.unexpected_errors() == [], clients.unexpected_errors()
        # On the clusters: what clients wrote themselves, not the mirror's copies.
        records_a, _ = a.values(topic)
        records_b, _ = b.values(topic)
        in_a = [v for v, mirrored in records_a if not mirrored]
        in_b = [v for v, mirrored in records_b if not mirrored]
        confirmed = set(clients.confirmed)
        both = set(in_a) & set(in_b)
        assert both == set(), sorted(both)[:10]
        missing = confirmed - set(in_a) - set(in_b)
        assert missing == set(), sorted(missing)[:10]
        assert len(in_a) == len(set(in_a)) and len(in_b) == len(set(in_b)), "no message written twice"
        assert len(in_b) > 300 and len(in_a) > 300
        after_back = set(clients.confirmed[count_back:])
        assert after_back <= set(in_a), sorted(after_back - set(in_a))[:10]
        # The consumer read on B (from the group's offsets there) and on A again after the switch back.
        read = set(clients.read)
        assert len(read & set(in_b)) >= 0.8 * len(in_b), (len(read & set(in_b)), len(in_b))
        assert after_back <= read, sorted(after_back - read)[:10]
        assert d.metric("mskdns_proxy_switches_total") == 2
    finally:
        for m in locals().get("mirrors", []):
            m.stop.set()
        a.stop()
        b.stop()


def test_topic_ids_clients_saw_are_kept_in_the_state_file_across_a_restart(daemon, tmp_path):
    """After a switch the proxy shows the first cluster's topic ids; a restart on the new cluster
    must not show the new cluster's own (librdkafka clients reconnecting would meet a changed id)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    a, b = NamedTansu(tmp_path, "a"), NamedTansu(tmp_path, "b")
    try:
        topic = f"ids-{uuid.uuid4().hex[:6]}"
        for cluster in (a, b):
            admin = AdminClient({"bootstrap.servers": cluster.boot})
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
        id_a, id_b = topic_id(a.boot, topic), topic_id(b.boot, topic)
        assert id_a != id_b
        state = tmp_path / "proxy-state.json"
        first, last = port_range()
        keep = f'state_file = "{state}"\n'
        d = daemon(config(a, first, last) + keep)
        boot = "%s:%d" % d.proxies[0]
        assert topic_id(boot, topic) == id_a
        switch(d, config(b, first, last) + keep)
        # The proxy asks B for its topics at the switch: the id is translated before any client asks.
        assert wait_for(lambda: "topic ids learned from the cluster" in d.log_text(), timeout=10), d.log_text()[-2000:]
        assert "a topic has another id on this cluster" in d.log_text()
        assert topic_id(boot, topic) == id_a
        assert wait_for(lambda: topic in state.read_text() if state.exists() else False, timeout=10)
        # Hostile clients now that Fetch requests are translated: damaged ids, a request larger
        # than the proxy holds to translate (its first 80 KiB sent, the rest never): each connection
        # is closed at once, and another client is served meanwhile.
        host, port = d.proxies[0]
        header = struct.pack(">hhih", 1, 13, 7, -1) + b"\x00"
        damaged = header + b"\xff" * 40
        for frame in (struct.pack(">i", len(damaged)) + damaged, struct.pack(">i", 2 << 20) + header + b"\x00" * (80 << 10)):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(frame)
                assert s.recv(100) == b"", "the proxy closes the connection"
            assert topic_id(boot, topic) == id_a
        assert "cannot translate the topic ids of a Fetch v13 request" in d.log_text()
        assert d.stop() == 0
        kept = json.loads(state.read_text())["topic_ids"]
        assert kept[topic] == id_a

        again = daemon(config(b, first, last) + keep)
        assert wait_for(lambda: "a topic has another id on this cluster" in again.log_text(), timeout=10)
        assert topic_id("%s:%d" % again.proxies[0], topic) == id_a
        # Without the file the new cluster's own id shows: the file is what kept it.
        fresh = daemon(config(b, first, last).replace(f"{first}-{last}", "%d-%d" % port_range()))
        assert topic_id("%s:%d" % fresh.proxies[0], topic) == id_b
    finally:
        a.stop()
        b.stop()
