"""The packaging files pass the validators that run here."""
import glob
import socket
import subprocess

from conftest import BIN, ROOT, require


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def test_systemd_unit_verifies(tmp_path):
    # verify checks that ExecStart exists: point it at the binary just built.
    unit = (ROOT / "packaging/systemd/mskdns.service").read_text().replace("/usr/bin/mskdns", str(BIN))
    (tmp_path / "mskdns.service").write_text(unit)
    (tmp_path / "mskdns.socket").write_text((ROOT / "packaging/systemd/mskdns.socket").read_text())
    out = run(require("systemd-analyze"), "verify", str(tmp_path / "mskdns.socket"), str(tmp_path / "mskdns.service"))
    assert "mskdns.service" not in out and "mskdns.socket" not in out, out  # any finding names the unit
    assert "DynamicUser=yes" in unit and "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit


def test_cloudformation_lints():
    run(require("cfn-lint"), str(ROOT / "packaging/cloudformation/mskdns.yaml"))
    run(require("cfn-lint"), str(ROOT / "packaging/cloudformation/fleet.yaml"))


def test_the_fleet_template_deploys(moto):
    """The fleet template's stack, created in moto's CloudFormation: the bucket, the reader
    policy, the publisher's task and schedule; its output is the URL readers and the publisher use."""
    import boto3

    kw = dict(region_name="us-east-1", endpoint_url=moto.url, aws_access_key_id="test", aws_secret_access_key="test")
    ec2, cf = moto.ec2, boto3.client("cloudformation", **kw)
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.40.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="publisher", Description="publisher", VpcId=vpc)["GroupId"]
    params = {
        "BucketName": "acme-mskdns",
        "PublisherImage": "registry.example/mskdns:1",
        "Subnets": subnet,
        "SecurityGroup": group,
        "ReaderAccounts": "111122223333",
        "DefaultTarget": "vpce-0abc",
    }
    cf.create_stack(
        StackName="fleet",
        TemplateBody=(ROOT / "packaging/cloudformation/fleet.yaml").read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
    )
    stack = cf.describe_stacks(StackName="fleet")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["SnapshotUrl"] == "s3://acme-mskdns/discovery/snapshot.json"
    kinds = {r["ResourceType"] for r in cf.list_stack_resources(StackName="fleet")["StackResourceSummaries"]}
    assert {"AWS::S3::Bucket", "AWS::IAM::ManagedPolicy", "AWS::ECS::TaskDefinition", "AWS::Events::Rule"} <= kinds, kinds
    boto3.client("s3", **kw).head_bucket(Bucket="acme-mskdns")


def test_kubernetes_manifests_validate():
    files = sorted(glob.glob(str(ROOT / "packaging/kubernetes/*.yaml")))
    assert len(files) == 2
    out = run(require("kubernetes-validate"), "--strict", *files)
    assert out.count("passed") == 4, out


def test_readiness_is_signalled_to_systemd(daemon, tmp_path, nsd):
    """Type=notify: with NOTIFY_SOCKET set, mskdns sends READY=1 once its sockets are bound."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    d = daemon(f"""
[dns]
listen = ["127.0.0.1:0"]
upstreams = ["127.0.0.1:{nsd.port}"]
[admin]
listen = "127.0.0.1:0"
""", env={"NOTIFY_SOCKET": path})
    assert b"READY=1" in sock.recv(4096)
    assert d.alive()
