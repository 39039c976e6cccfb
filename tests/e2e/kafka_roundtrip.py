"""A Kafka client's round trip, run as its own process (on a client host, through `ip netns exec`):
creates a topic, produces MESSAGES records, reads them back in a consumer group, and prints one
JSON line: the values read, the brokers the client was told about, the committed offsets.

    python3 kafka_roundtrip.py confluent|kafka-python BOOTSTRAP CA_FILE|- TOPIC MESSAGES

With a CA file the client speaks TLS and verifies the broker's certificate and host name against it.
"""
import json
import sys
import time


def confluent(boot, ca, topic, n):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    tls = {"security.protocol": "SSL", "ssl.ca.location": ca, "ssl.endpoint.identification.algorithm": "https"} if ca else {}
    admin = AdminClient({"bootstrap.servers": boot, **tls})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    brokers = sorted(f"{b.host}:{b.port}" for b in admin.list_topics(timeout=10).brokers.values())
    p = Producer({"bootstrap.servers": boot, "linger.ms": 5, "acks": "all", **tls})
    for i in range(n):
        p.produce(topic, value=f"record-{i:05d}".encode())
        if i % 500 == 0:
            p.poll(0)
    left = p.flush(60)
    c = Consumer({"bootstrap.servers": boot, "group.id": f"g-{topic}", "auto.offset.reset": "earliest", **tls})
    c.subscribe([topic])
    got = set()
    ends = {}
    deadline = time.time() + 90
    while len(got) < n and time.time() < deadline:
        m = c.poll(1.0)
        if m is not None and not m.error():
            got.add(m.value().decode())
            ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    # The offsets read are committed by name: a commit of "the current position" skips a partition
    # whose position a rebalance reset, which is the group's business, not the proxy's.
    c.commit(offsets=[TopicPartition(topic, p, o) for p, o in ends.items()], asynchronous=False)
    back = c.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    committed = sum(tp.offset for tp in back)
    c.close()
    return {"unsent": left, "values": sorted(got), "brokers": brokers, "committed": committed}


def kafka_python(boot, ca, topic, n):
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    tls = {"security_protocol": "SSL", "ssl_cafile": ca, "ssl_check_hostname": True} if ca else {}
    admin = KafkaAdminClient(bootstrap_servers=boot, **tls)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=boot, linger_ms=5, acks="all", **tls)
    for i in range(n):
        producer.send(topic, value=f"record-{i:05d}".encode())
    producer.flush(60)
    brokers = sorted(f"{b.host}:{b.port}" for b in producer._metadata.brokers())
    producer.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=boot, group_id=f"g-{topic}", auto_offset_reset="earliest",
        consumer_timeout_ms=60000, **tls,
    )
    got = set()
    for m in consumer:
        got.add(m.value.decode())
        if len(got) == n:
            break
    consumer.commit()
    committed = sum(consumer.committed(tp) or 0 for tp in consumer.assignment())
    consumer.close()
    return {"unsent": 0, "values": sorted(got), "brokers": brokers, "committed": committed}


if __name__ == "__main__":
    kind, boot, ca, topic, n = sys.argv[1:6]
    run = {"confluent": confluent, "kafka-python": kafka_python}[kind]
    print(json.dumps(run(boot, None if ca == "-" else ca, topic, int(n))))
