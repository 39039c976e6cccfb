"""One discovery for a fleet: a publisher daemon ([discovery.aws] + [discovery.publish]) writes
the discovered state to moto's S3; reader daemons ([discovery.snapshot]) answer from it. Every
AWS call goes through the MskFront relay (conftest.py), which records who made it (the access
key id each daemon runs with) and to which service, so the test counts calls per caller."""
import json
import subprocess
import time
from collections import Counter

import boto3
import dns.rcode
import pytest

from conftest import BIN, Moto, wait_for
from test_discovery import REGION, TAGGED, Msk
from test_dns import addresses, ask

BUCKET = "mskdns-fleet"
KEY = "discovery/us-east-1.json"
URL = f"s3://{BUCKET}/{KEY}"


def s3(moto):
    return boto3.client("s3", region_name=REGION, endpoint_url=moto.url, aws_access_key_id="test", aws_secret_access_key="test")


def env(msk, caller):
    """Every AWS call through the counting relay, signed with the caller's own access key id."""
    return {**msk.front.env, "AWS_ENDPOINT_URL": msk.front.url, "AWS_ACCESS_KEY_ID": caller}


BASE = """
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:9"]
unknown_clusters = "nxdomain"

[admin]
listen = "127.0.0.1:0"

[reload]
poll_secs = 0
"""


def publisher_config(tmp_path, publish=True):
    text = BASE + f"""
[aws]
refresh_secs = 1
s3_path_style = true
state_dir = "{tmp_path / "publisher-state"}"

[discovery.aws]
regions = ["{REGION}"]
refresh_secs = 1
jitter = 0.0
max_backoff_secs = 1
default_target = "addresses=10.9.9.9"
ttl = 30
"""
    return text + (f'\n[discovery.publish]\nurl = "{URL}"\n' if publish else "")


def reader_config(tmp_path, name, max_age=3, extra=""):
    return BASE + f"""
[aws]
s3_path_style = true
state_dir = "{tmp_path / (name + "-state")}"

[discovery.snapshot]
url = "{URL}"
poll_secs = 1
max_age_secs = {max_age}
""" + extra


def dual_stack_endpoint(moto):
    """An interface VPC endpoint whose network interface has an IPv4 and an IPv6 address."""
    ec2 = moto.ec2
    vpc = ec2.create_vpc(CidrBlock="10.31.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.31.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    ep = ec2.create_vpc_endpoint(
        VpcId=vpc, ServiceName="com.amazonaws.vpce.us-east-1.vpce-svc-0fleet", VpcEndpointType="Interface", SubnetIds=[subnet]
    )["VpcEndpoint"]
    eni = ep["NetworkInterfaceIds"][0]
    ec2.assign_ipv6_addresses(NetworkInterfaceId=eni, Ipv6Addresses=["2600:1f18:31:1::10"])
    v4 = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]["PrivateIpAddress"]
    return ep["VpcEndpointId"], v4, "2600:1f18:31:1::10"


def calls_by(front, caller):
    return [c for c in list(front.log) if c[0] == caller]


def test_one_publisher_serves_five_readers(daemon, moto, tmp_path):
    msk = Msk(moto)
    s3(moto).create_bucket(Bucket=BUCKET)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10 10.1.1.10"})
    vpce, v4, v6 = dual_stack_endpoint(moto)
    # Dual-stack: MSK gives this cluster's names only in its IPv6 bootstrap string.
    arn, payments = msk.serverless("payments", "e5f6a7b8", {**TAGGED, "mskdns:target": vpce})
    msk.front.bootstrap[arn] = {"bootstrapBrokerStringSaslIamIpv6": f"{payments}:9098"}

    pub = daemon(publisher_config(tmp_path), env=env(msk, "AKIDPUBLISHER"), name="publisher.toml")
    # Published once the endpoint's addresses are read too.
    def published():
        try:
            doc = json.loads(s3(moto).get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
        except Exception:
            return None
        return doc if vpce in doc.get("endpoints", {}) else None

    doc = wait_for(published, timeout=20)
    assert doc, pub.log_text()[-3000:]
    assert doc["version"] == 1
    assert sorted(c["bootstrap"] for c in doc["clusters"]) == sorted([orders, payments])
    assert sorted(a["ip"] for a in doc["endpoints"][vpce]) == sorted([v4, v6])

    readers = [
        daemon(reader_config(tmp_path, f"reader{i}"), env=env(msk, f"AKIDREADER{i}"), name=f"reader{i}.toml")
        for i in range(5)
    ]
    for r in readers:
        assert wait_for(lambda: addresses(ask(r, orders)) == ["10.1.0.10", "10.1.1.10"], timeout=10)
        assert addresses(ask(r, payments)) == [v4]
        assert addresses(ask(r, payments.replace("boot-", "b0101-"), "AAAA")) == [v6]

    # A cluster added in MSK reaches every reader within one publish and one poll.
    _, events = msk.serverless("events", "99aa88bb", {**TAGGED, "mskdns:target": "addresses=10.7.0.1"})
    added = time.time()
    for r in readers:
        assert wait_for(lambda: addresses(ask(r, events)) == ["10.7.0.1"], timeout=10)
    took = time.time() - added
    # One MSK refresh (1 s), one EC2 check (the publisher looks every 5 s), one poll (1 s).
    assert took < 10, took
    time.sleep(5)

    # Calls per caller: MSK and EC2 only from the publisher; readers only GET the object from S3,
    # most of them answered 304.
    pub_services = Counter(c[1] for c in calls_by(msk.front, "AKIDPUBLISHER"))
    assert pub_services["kafka"] > 0 and pub_services["ec2"] > 0, pub_services
    puts = [c for c in calls_by(msk.front, "AKIDPUBLISHER") if c[1] == "s3" and c[2] == "PUT"]
    # Written when the state changed (first without, then with the endpoint's addresses; the new
    # cluster), not on each of its many passes.
    assert 1 <= len(puts) <= 4, puts
    assert pub.metric("mskdns_discovery_refreshes_total", source="msk", result="ok") > 2 * len(puts)
    for i, r in enumerate(readers):
        calls = calls_by(msk.front, f"AKIDREADER{i}")
        assert {(c[1], c[2], c[3]) for c in calls} == {("s3", "GET", f"/{BUCKET}/{KEY}")}, calls
        statuses = Counter(c[4] for c in calls)
        assert statuses[304] > statuses[200] >= 2, statuses
        assert r.metric("mskdns_discovery_snapshot_fetches_total", result="not_modified") >= statuses[304] - 1
        assert abs(r.metric("mskdns_discovery_snapshot_pass_timestamp_seconds") - time.time()) < 60
        assert r.http("/readyz") == (200, "ready\n")

    # S3 stops: readers keep answering; past max_age_secs /readyz says degraded, with the age.
    moto.stop()
    r0 = readers[0]
    assert wait_for(lambda: "past discovery.snapshot.max_age_secs" in r0.http("/readyz")[1], timeout=15), r0.http("/readyz")
    status, body = r0.http("/readyz")
    assert status == 200 and "snapshot" in body and "s old" in body, body
    assert addresses(ask(r0, orders)) == ["10.1.0.10", "10.1.1.10"]
    assert addresses(ask(r0, events)) == ["10.7.0.1"]
    assert r0.metric("mskdns_discovery_snapshot_age_seconds") >= 3

    # A reader restarted while S3 is down serves its saved snapshot from the first query.
    r0.stop()
    again = daemon(reader_config(tmp_path, "reader0"), env=env(msk, "AKIDREADER0"), name="reader0-again.toml")
    assert addresses(ask(again, events)) == ["10.7.0.1"]
    assert addresses(ask(again, payments, "AAAA")) == [v6]
    status, body = again.http("/readyz")
    assert status == 200 and "serving the saved snapshot" in body, body
    msk.front.stop()


def valid_document(bootstrap, ip, pass_time="2026-12-06T08:00:00Z"):
    return {
        "version": 1,
        "pass_time": pass_time,
        "publisher": "test",
        "clusters": [{"bootstrap": bootstrap, "target": f"addresses={ip}", "ttl": 30, "arn": "arn:x", "name": "x"}],
        "endpoints": {},
        "subnets": {},
    }


def test_a_bad_snapshot_is_rejected_and_the_last_good_one_kept(daemon, moto, tmp_path):
    client = s3(moto)
    client.create_bucket(Bucket=BUCKET)
    boot = "boot-aaaa1111.c1.kafka-serverless.us-east-1.amazonaws.com"
    other = "boot-bbbb2222.c1.kafka-serverless.us-east-1.amazonaws.com"
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(valid_document(boot, "10.2.0.1")).encode())
    extra = "max_bytes = 4096\n"
    text = reader_config(tmp_path, "reader", max_age=600, extra=extra)
    d = daemon(text, env={**moto.env, "AWS_ACCESS_KEY_ID": "AKIDREADER"})
    assert wait_for(lambda: addresses(ask(d, boot)) == ["10.2.0.1"], timeout=10)

    bad_cluster = valid_document(other, "10.2.0.2")
    bad_cluster["clusters"][0]["bootstrap"] = "boot-bbbb2222.example.com"
    cases = [
        ("json", b'{"version": 1, "clusters": [', "not a JSON object"),
        ("version", json.dumps({**valid_document(other, "10.2.0.2"), "version": 2}).encode(), "version 2; this build reads version 1"),
        ("size", json.dumps({**valid_document(other, "10.2.0.2"), "padding": "x" * 5000}).encode(), "past discovery.snapshot.max_bytes (4096)"),
        ("invalid", json.dumps(bad_cluster).encode(), "clusters[0].bootstrap"),
    ]
    for kind, body, reason in cases:
        client.put_object(Bucket=BUCKET, Key=KEY, Body=body)
        assert wait_for(lambda: d.metric("mskdns_discovery_snapshot_rejected_total", reason=kind) == 1, timeout=10), kind
        # Logged once with the reason, and not fetched again while it stays.
        time.sleep(2.5)
        assert d.metric("mskdns_discovery_snapshot_rejected_total", reason=kind) == 1, kind
        log = d.log_text()
        assert "discovery snapshot rejected" in log and reason in log, (kind, log[-2000:])
        assert addresses(ask(d, boot)) == ["10.2.0.1"], kind
        assert ask(d, other).rcode() == dns.rcode.NXDOMAIN, kind
        status, body_text = d.http("/readyz")
        assert status == 200 and "rejected" in body_text, body_text

    # A good one again is taken, and the saved copy follows it.
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(valid_document(other, "10.2.0.2")).encode())
    assert wait_for(lambda: addresses(ask(d, other)) == ["10.2.0.2"], timeout=10)
    assert ask(d, boot).rcode() == dns.rcode.NXDOMAIN
    assert wait_for(lambda: d.http("/readyz") == (200, "ready\n"), timeout=5), d.http("/readyz")
    saved = json.loads((tmp_path / "reader-state" / "discovery-snapshot.json").read_text())
    assert saved["document"]["clusters"][0]["bootstrap"] == other

    # A cluster led to a VPC endpoint the publisher had not read yet: named on /readyz (degraded),
    # and the next document with its addresses clears it.
    unread = valid_document(other, "10.2.0.2")
    unread["clusters"].append({**unread["clusters"][0], "bootstrap": boot, "target": "vpce-0notreadyet"})
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(unread).encode())
    assert wait_for(lambda: "vpce-0notreadyet" in d.http("/readyz")[1], timeout=10), d.http("/readyz")
    assert d.http("/readyz")[0] == 200 and ask(d, boot).rcode() == dns.rcode.SERVFAIL
    unread["endpoints"] = {"vpce-0notreadyet": [{"ip": "10.2.0.9", "az": "us-east-1a"}]}
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(unread).encode())
    assert wait_for(lambda: addresses(ask(d, boot)) == ["10.2.0.9"], timeout=10)
    assert wait_for(lambda: d.http("/readyz") == (200, "ready\n"), timeout=5), d.http("/readyz")
    unread["clusters"].pop()
    unread["endpoints"] = {}
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(unread).encode())
    assert wait_for(lambda: ask(d, boot).rcode() == dns.rcode.NXDOMAIN, timeout=10)

    # `mskdns discover --json` reports what the snapshot serves, and fails with the reason
    # when S3 cannot be read.
    cfg = tmp_path / "discover.toml"
    cfg.write_text(text)
    run_env = {**moto.env, "AWS_ACCESS_KEY_ID": "AKIDREADER", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([BIN, "--config", str(cfg), "discover", "--json"], capture_output=True, text=True, env=run_env, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [(c["bootstrap"], c["target"], c["status"]) for c in report["clusters"]] == [(other, "addresses=10.2.0.2", "served")]
    assert report["snapshot"]["url"] == URL
    moto.stop()
    out = subprocess.run([BIN, "--config", str(cfg), "discover", "--json"], capture_output=True, text=True, env=run_env, timeout=120)
    assert out.returncode == 1 and URL in out.stderr, (out.returncode, out.stderr)


def test_discover_publish_writes_once_and_on_condition(moto, tmp_path):
    msk = Msk(moto)
    client = s3(moto)
    client.create_bucket(Bucket=BUCKET)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10"})
    cfg = tmp_path / "publish.toml"
    cfg.write_text(publisher_config(tmp_path, publish=False))
    run_env = {**env(msk, "AKIDJOB"), "PATH": "/usr/bin:/bin"}

    def publish():
        return subprocess.run([BIN, "--config", str(cfg), "discover", "--publish", URL], capture_output=True, text=True, env=run_env, timeout=60)

    out = publish()
    assert out.returncode == 0 and "published" in out.stderr, out.stderr
    first = client.get_object(Bucket=BUCKET, Key=KEY)
    doc = json.loads(first["Body"].read())
    assert [c["bootstrap"] for c in doc["clusters"]] == [orders]
    # Nothing changed: not written again.
    out = publish()
    assert out.returncode == 0 and "unchanged" in out.stderr, out.stderr
    assert client.get_object(Bucket=BUCKET, Key=KEY)["ETag"] == first["ETag"]
    puts = [c for c in msk.front.log if c[0] == "AKIDJOB" and c[2] == "PUT"]
    assert len(puts) == 1 and all(c[4] == 200 for c in puts), puts

    # Another writer's document in between: replaced whole, on the ETag just read.
    client.put_object(Bucket=BUCKET, Key=KEY, Body=json.dumps(valid_document(orders, "10.6.6.6")).encode())
    out = publish()
    assert out.returncode == 0 and "published" in out.stderr, out.stderr
    doc = json.loads(client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    assert doc["clusters"][0]["target"] == "addresses=10.1.0.10"

    # MSK unreachable: exit 1, and the object is left as it was.
    before = client.get_object(Bucket=BUCKET, Key=KEY)["ETag"]
    msk.front.stop()
    out = publish()
    assert out.returncode == 1 and "nothing published" in out.stderr, out.stderr
    assert client.get_object(Bucket=BUCKET, Key=KEY)["ETag"] == before


def test_two_publishers_on_one_object_never_tear_it(daemon, moto, tmp_path):
    """Both publish the same discovery; the one whose ETag is stale gets 412, reads the object
    again, finds its state there and writes nothing: one whole write per change."""
    import threading

    msk = Msk(moto)
    client = s3(moto)
    client.create_bucket(Bucket=BUCKET)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10"})
    first = daemon(publisher_config(tmp_path), env=env(msk, "AKIDPUBA"), name="pub-a.toml")
    assert wait_for(lambda: any(c[0] == "AKIDPUBA" and c[2] == "PUT" for c in list(msk.front.log)), timeout=15)
    text = publisher_config(tmp_path).replace("publisher-state", "publisher-b-state")
    second = daemon(text, env=env(msk, "AKIDPUBB"), name="pub-b.toml")
    # The second reads the object, finds its own state, writes nothing.
    assert wait_for(lambda: second.metric("mskdns_discovery_publish_total", result="unchanged") >= 1, timeout=15)

    torn = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                body = client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
                json.loads(body)
            except json.JSONDecodeError:
                torn.append(body)
            except Exception:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for n, cid in enumerate(["99aa88bb", "77cc66dd"]):
        _, boot = msk.serverless(f"events{n}", cid, {**TAGGED, "mskdns:target": f"addresses=10.7.0.{n + 1}"})
        assert wait_for(lambda: boot in client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read().decode(), timeout=15)
        time.sleep(7)  # both publishers past their next EC2 check
    stop.set()
    watcher.join()
    assert torn == []
    puts = [c for c in list(msk.front.log) if c[1] == "s3" and c[2] == "PUT"]
    written = [c for c in puts if c[4] == 200]
    refused = [c for c in puts if c[4] == 412]
    # The first state, then one write per change, whoever made it; the other's write was refused.
    assert len(written) == 3, puts
    assert len(refused) >= 1, puts
    assert first.metric("mskdns_discovery_publish_total", result="error") == 0
    assert second.metric("mskdns_discovery_publish_total", result="error") == 0
    doc = json.loads(client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    assert len(doc["clusters"]) == 3
    msk.front.stop()


class HostileS3:
    """An S3 endpoint that misbehaves on demand (no real store stalls when asked): `good` serves
    `body` with its ETag (304 for If-None-Match; 404 while it is None), `half` sends the headers
    and half the body then stalls, `silent` reads the request and answers nothing, `endless`
    streams chunks forever. PUT by `put_mode`: `good` stores the body, `silent` takes nothing and
    answers nothing, `half` takes the body and stops halfway through the status line."""

    def __init__(self):
        import hashlib
        import http.server
        import threading

        self.mode = "good"
        self.put_mode = "good"
        self.body = b""
        self.requests = []
        self.closing = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((outer.mode, self.path))
                body = outer.body
                etag = '"%s"' % hashlib.md5(body or b"").hexdigest()
                if outer.mode == "silent":
                    outer.closing.wait(120)
                    return
                if outer.mode == "endless":
                    self.send_response(200)
                    self.send_header("ETag", '"endless"')
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = b"x" * 1024
                    try:
                        while not outer.closing.is_set():
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    except OSError:
                        return
                    return
                if outer.mode == "good" and body is None:
                    self.send_response(404)
                    self.send_header("Content-Type", "application/xml")
                    err = b"<Error><Code>NoSuchKey</Code><Message>absent</Message></Error>"
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                if outer.mode == "good" and self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.mode == "half":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    outer.closing.wait(120)
                    return
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("put-" + outer.put_mode, self.path))
                if outer.put_mode == "silent":
                    outer.closing.wait(120)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if outer.put_mode == "half":
                    self.wfile.write(b"HTTP/1.1 20")
                    self.wfile.flush()
                    outer.closing.wait(120)
                    return
                outer.body = body
                self.send_response(200)
                self.send_header("ETag", '"%s"' % hashlib.md5(body).hexdigest())
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_stalled_or_endless_s3_is_cut_off_and_the_last_good_snapshot_served(daemon, tmp_path):
    fake = HostileS3()
    boot = "boot-aaaa1111.c1.kafka-serverless.us-east-1.amazonaws.com"
    other = "boot-bbbb2222.c1.kafka-serverless.us-east-1.amazonaws.com"
    fake.body = json.dumps(valid_document(boot, "10.2.0.1")).encode()
    aws = {"AWS_ENDPOINT_URL": fake.url, "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
    d = daemon(reader_config(tmp_path, "reader", max_age=600, extra="max_bytes = 4096\n"), env=aws)
    try:
        assert wait_for(lambda: addresses(ask(d, boot)) == ["10.2.0.1"], timeout=10)
        for mode in ("half", "silent"):
            fake.mode = mode
            errors = d.metric("mskdns_discovery_snapshot_fetches_total", result="error")
            # Cut off within the read timeout (10 s; the SDK retries a silent endpoint twice).
            assert wait_for(lambda: d.metric("mskdns_discovery_snapshot_fetches_total", result="error") > errors, timeout=45), mode
            assert addresses(ask(d, boot)) == ["10.2.0.1"], mode
        fake.mode = "endless"
        assert wait_for(lambda: d.metric("mskdns_discovery_snapshot_rejected_total", reason="size") >= 1, timeout=30)
        assert "past discovery.snapshot.max_bytes (4096)" in d.log_text()
        assert addresses(ask(d, boot)) == ["10.2.0.1"]
        # The store behaves again, with a new document: taken at the next poll.
        fake.body = json.dumps(valid_document(other, "10.2.0.2")).encode()
        fake.mode = "good"
        assert wait_for(lambda: addresses(ask(d, other)) == ["10.2.0.2"], timeout=15)
        assert d.alive()
        # A SIGTERM while a poll hangs: the daemon ends at once, the poll abandoned.
        fake.mode = "silent"
        polls = len(fake.requests)
        assert wait_for(lambda: any(r[0] == "silent" for r in fake.requests[polls:]), timeout=10)
        d.assert_stops_at_once()
    finally:
        fake.stop()


def test_a_store_that_stalls_a_write_cuts_the_publisher_off_and_it_publishes_again(daemon, moto, tmp_path):
    """The publisher is a writer: a store that takes the PUT and never answers, or stops halfway
    through its answer, fails that publish within the S3 timeouts while the daemon keeps answering
    (its own discovery goes on), /readyz names it; the next good store gets the new state; and a
    SIGTERM during a stalled PUT ends the daemon at once."""
    fake = HostileS3()
    fake.body = None
    msk = Msk(moto)
    _, orders = msk.serverless("orders", "a1b2c3d4", {**TAGGED, "mskdns:target": "addresses=10.1.0.10"})
    aws = {**env(msk, "AKIDPUBLISHER"), "AWS_ENDPOINT_URL_S3": fake.url}
    pub = daemon(publisher_config(tmp_path), env=aws, name="publisher.toml")

    def held():
        try:
            return sorted(c["bootstrap"] for c in json.loads(fake.body)["clusters"])
        except Exception:
            return None

    try:
        assert wait_for(lambda: held() == [orders], timeout=20), pub.log_text()[-3000:]
        grown = [orders]
        for mode, cluster in (("silent", "b1c2d3e4"), ("half", "c1d2e3f4")):
            fake.put_mode = mode
            _, added = msk.serverless(f"more-{cluster}", cluster, {**TAGGED, "mskdns:target": "addresses=10.1.0.11"})
            grown.append(added)
            # Discovery and answers go on while the write hangs.
            assert wait_for(lambda: addresses(ask(pub, added)) == ["10.1.0.11"], timeout=10), mode
            # (An attempt begun just before the mode changed still meets the previous one.)
            assert wait_for(lambda: any(r[0] == "put-" + mode for r in fake.requests), timeout=45), mode
            errors = pub.metric("mskdns_discovery_publish_total", result="error")
            assert wait_for(lambda: pub.metric("mskdns_discovery_publish_total", result="error") > errors, timeout=75), mode
            assert addresses(ask(pub, orders)) == ["10.1.0.10"], mode
            status, body = pub.http("/readyz")
            assert status == 200 and "degraded" in body and "cannot publish" in body, body
            assert held() == [orders], mode  # nothing half-written
        fake.put_mode = "good"
        assert wait_for(lambda: held() == sorted(grown), timeout=75), pub.log_text()[-3000:]
        assert wait_for(lambda: pub.http("/readyz") == (200, "ready\n"), timeout=10)

        # A SIGTERM while a write hangs: the daemon ends at once, the write abandoned.
        fake.put_mode = "silent"
        msk.serverless("last", "d1e2f3a4", {**TAGGED, "mskdns:target": "addresses=10.1.0.12"})
        puts = sum(1 for r in fake.requests if r[0] == "put-silent")
        assert wait_for(lambda: sum(1 for r in fake.requests if r[0] == "put-silent") > puts, timeout=15)
        pub.assert_stops_at_once()
    finally:
        fake.stop()
        msk.front.stop()
