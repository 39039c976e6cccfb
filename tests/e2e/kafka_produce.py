"""A producer that keeps writing while the test restarts the proxy, run as its own process (on a
client host, through `ip netns exec`): creates a topic, produces MESSAGES records at a steady pace
(idempotent: a request cut with the connection is sent again and the broker keeps it once), then
reads the topic back and prints one JSON line: the values the producer was told were delivered,
the values read (duplicates kept), and what was left unsent.

    python3 kafka_produce.py BOOTSTRAP CA_FILE TOPIC MESSAGES SECONDS
"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def main(boot, ca, topic, n, seconds):
    tls = {"security.protocol": "SSL", "ssl.ca.location": ca, "ssl.endpoint.identification.algorithm": "https"}
    admin = AdminClient({"bootstrap.servers": boot, **tls})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=60)
    delivered, failed = [], []

    def report(err, msg):
        (failed if err else delivered).append(msg.value().decode())

    p = Producer({"bootstrap.servers": boot, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
                  "message.timeout.ms": 120000, "reconnect.backoff.max.ms": 500, **tls})
    start = time.time()
    for i in range(n):
        p.produce(topic, value=f"m-{i:05d}".encode(), callback=report)
        p.poll(0)
        time.sleep(max(0.0, start + seconds * (i + 1) / n - time.time()))
    left = p.flush(120)
    c = Consumer({"bootstrap.servers": boot, "group.id": f"g-{topic}", "auto.offset.reset": "earliest", **tls})
    c.subscribe([topic])
    read = []
    deadline = time.time() + 90
    while len(read) < len(delivered) and time.time() < deadline:
        m = c.poll(1.0)
        if m is not None and not m.error():
            read.append(m.value().decode())
    # Anything more (a duplicate) arrives within a few more polls.
    for _ in range(3):
        m = c.poll(1.0)
        if m is not None and not m.error():
            read.append(m.value().decode())
    c.close()
    print(json.dumps({"unsent": left, "failed": failed, "delivered": delivered, "read": read}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
