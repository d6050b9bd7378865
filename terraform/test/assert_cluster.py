"""Assertions of terraform/check, run with the venv's Python (boto3 and PyYAML).

  assert_cluster.py defaults PLAN_JSON     the plan of the user-facing defaults
  assert_cluster.py arm64 PLAN_JSON        the plan for arm64 hosts with a published release
  assert_cluster.py make-zones FILE        creates Route 53 zones in moto as a user's would be;
                                           writes their ids to FILE (public, private, other)
  assert_cluster.py dns-direct PLAN_JSON   the plan of DNS records without a load balancer
  assert_cluster.py make-vpc FILE          creates a VPC in moto as a user's existing one would
                                           be; writes its ids to FILE, one per line
  assert_cluster.py existing PLAN_JSON FILE   the plan into that VPC
  assert_cluster.py present OUTPUTS_JSON FILE   what the apply made, read back from moto with
                                           boto3 (FILE: make-zones' ids)
  assert_cluster.py ansible OUTPUTS_JSON   the generated inventory, as ansible/site.yml sees it
  assert_cluster.py clean PLAN_JSON        a second plan after the apply changes nothing
  assert_cluster.py provisioned RECORD COUNT RELEASE   the provisioning stand-in's runs
  assert_cluster.py new-release PLAN_JSON  a plan after the release changed replaces only it
  assert_cluster.py gone OUTPUTS_JSON FILE after the destroy, nothing of the cluster is left

The cluster under test is described by moto.tfvars.json beside this file, which the check also
hands to Terraform, so the expectations and the configuration cannot drift apart. The moto
server's URL comes from MOTO_ENDPOINT. Every check is printed; the exit code is 1 if any failed.
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import yaml

import assert_edge as edge
import assert_provision as provision

HERE = Path(__file__).resolve().parent
TFVARS = json.loads((HERE / "moto.tfvars.json").read_text())
AMIS = json.loads((HERE / "amis.json").read_text())

# Defaults of the root module (variables.tf) that the test's tfvars leave alone.
VPC_CIDR = "10.42.0.0/16"
DEBIAN_OWNER = "136693071363"
APPREPO_API, BEACON_API, BEACON_CONTROL, MAESTRO_STATUS = 7070, 7080, 7443, 7090

passed = 0
failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"  ok   {what}")
    else:
        failed += 1
        print(f"  FAIL {what}" + (f": {detail}" if detail else ""))
    return ok


def client(service):
    return boto3.client(
        service,
        region_name=TFVARS["region"],
        endpoint_url=os.environ["MOTO_ENDPOINT"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def tags_of(tag_list):
    return {t["Key"]: t["Value"] for t in tag_list or []}


def has_cluster_tags(tags):
    want = {"Project": "platformx", "Cluster": TFVARS["name_prefix"], "ManagedBy": "terraform"}
    want.update(TFVARS.get("tags", {}))
    return all(tags.get(k) == v for k, v in want.items())


def newest_debian_ami(architecture="x86_64"):
    debian_arch = {"x86_64": "amd64", "arm64": "arm64"}[architecture]
    candidates = [
        a for a in AMIS
        if a["owner_id"] == DEBIAN_OWNER
        and a["name"].startswith(f"debian-12-{debian_arch}-")
        and a["architecture"] == architecture
    ]
    return max(candidates, key=lambda a: a["creation_date"])["ami_id"]


# --- arm64: Graviton hosts and the aarch64 release ------------------------------------------------

def cmd_arm64(plan_json):
    plan = json.loads(Path(plan_json).read_text())
    print("arm64 (plan with architecture = arm64, t4g instances and a published release):")
    instances = planned(plan, "aws_instance")
    ami = newest_debian_ami("arm64")
    check(len(instances) == 3 and {r["change"]["after"]["ami"] for r in instances} == {ami},
          f"every host from the newest Debian 12 arm64 AMI ({ami})",
          sorted({r["change"]["after"]["ami"] for r in instances}))
    check(all(r["change"]["after"]["instance_type"] == "t4g.small" for r in instances), "instances are t4g.small")
    steps = [rc["change"]["after"] for rc in plan["resource_changes"] if rc["address"] == provision.PROVISION]
    check(len(steps) == 1 and steps[0]["triggers_replace"]["target"] == "aarch64-unknown-linux-gnu",
          "the hosts are given the aarch64 release tarball (--release-target aarch64-unknown-linux-gnu)",
          [s.get("triggers_replace") for s in steps])


# --- defaults: the plan a user gets with nothing but an SSH key --------------------------------

def planned(plan, rtype):
    return [r for r in plan["resource_changes"] if r["type"] == rtype and "create" in r["change"]["actions"]]


def cmd_defaults(plan_json):
    plan = json.loads(Path(plan_json).read_text())
    print("defaults (plan with only ssh_public_key set):")

    instances = planned(plan, "aws_instance")
    roles = sorted(r["change"]["after"]["tags"]["PlatformxRole"] for r in instances)
    check(roles == ["control", "web", "web"], "one control host and two web servers", roles)
    provision.defaults(check, plan)
    check(all(r["change"]["after"]["instance_type"] == "t3.small" for r in instances), "instances are t3.small")
    check(
        all(r["change"]["after"]["root_block_device"][0]["volume_size"] == 20
            and r["change"]["after"]["root_block_device"][0]["encrypted"] for r in instances),
        "20 GiB encrypted root volumes",
    )
    check(
        all(r["change"]["after"]["metadata_options"][0]["http_tokens"] == "required" for r in instances),
        "IMDSv2 required",
    )
    check(not planned(plan, "aws_lb"), "no load balancer")
    edge.plan_defaults(check, plan)

    rules = [r["change"]["after"] for r in planned(plan, "aws_vpc_security_group_ingress_rule")]
    check(not [r for r in rules if r["from_port"] == 22], "no SSH rule without admin_cidrs")
    outside = sorted(r["from_port"] for r in rules if r["cidr_ipv4"] != VPC_CIDR)
    check(outside == [80, 443], "only 80 and 443 reachable from outside the VPC", outside)
    inside = sorted(r["from_port"] for r in rules if r["cidr_ipv4"] == VPC_CIDR)
    check(inside == sorted([APPREPO_API, BEACON_API, BEACON_CONTROL, MAESTRO_STATUS]),
          "control ports open to the VPC CIDR only", inside)

    bucket = planned(plan, "aws_s3_bucket")[0]["change"]["after"]
    check(bucket["bucket_prefix"] == "platformx-bundles-" and bucket["force_destroy"] is False,
          "bucket named platformx-bundles-*, not force-destroyed")
    sse = planned(plan, "aws_s3_bucket_server_side_encryption_configuration")[0]["change"]["after"]
    algo = sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    check(algo == "AES256", "SSE-S3 (AES256) by default", algo)
    lc = planned(plan, "aws_s3_bucket_lifecycle_configuration")[0]["change"]["after"]
    days = [r["noncurrent_version_expiration"][0]["noncurrent_days"] for r in lc["rule"] if r["noncurrent_version_expiration"]]
    check(days == [30], "noncurrent versions expire after 30 days", days)

    vpc = planned(plan, "aws_vpc")[0]["change"]["after"]
    check(vpc["cidr_block"] == VPC_CIDR, "VPC 10.42.0.0/16")
    tags_all = vpc.get("tags_all") or {}
    check(tags_all.get("Project") == "platformx" and tags_all.get("Cluster") == "platformx",
          "default tags Project=platformx, Cluster=platformx", tags_all)


# --- DNS: hosted zones, and records without a load balancer ----------------------------------

def cmd_make_zones(ids_file):
    edge.make_zones(check, client("route53"), client("ec2"), TFVARS["region"], ids_file)


def cmd_dns_direct(plan_json):
    plan = json.loads(Path(plan_json).read_text())
    print("DNS records without a load balancer (plan with create_dns_records and route53_zone_id):")
    edge.plan_without_load_balancer(check, plan, os.environ["TF_VAR_domain"])


# --- existing: a user's own VPC and subnets ---------------------------------------------------

EXISTING_CIDR = "10.77.0.0/16"


def cmd_make_vpc(ids_file):
    """A VPC with two public subnets in two AZs, and a subnet of another VPC."""
    ec2 = client("ec2")
    azs = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]][:2]
    vpc = ec2.create_vpc(CidrBlock=EXISTING_CIDR)["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.77.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
        for i, az in enumerate(azs)
    ]
    other = ec2.create_vpc(CidrBlock="10.78.0.0/16")["Vpc"]["VpcId"]
    foreign = ec2.create_subnet(VpcId=other, CidrBlock="10.78.0.0/24", AvailabilityZone=azs[0])["Subnet"]["SubnetId"]
    # A KMS key the plan only names (it is never applied), to see SSE-KMS planned.
    key = f"arn:aws:kms:{TFVARS['region']}:123456789012:key/0e1f5a3c-0000-4000-8000-000000000000"
    Path(ids_file).write_text("\n".join([vpc, json.dumps(subnets), json.dumps(subnets[:1]), json.dumps([foreign]), key]) + "\n")
    check(len(set(azs)) == 2, f"made {vpc} ({EXISTING_CIDR}) with subnets in {', '.join(azs)}")


def cmd_existing(plan_json, ids_file):
    plan = json.loads(Path(plan_json).read_text())
    vpc, subnets, _, _, key = Path(ids_file).read_text().splitlines()
    subnets = json.loads(subnets)
    print("existing VPC (plan with vpc_id, two subnet_ids, the load balancer and a KMS key):")
    made = {t for t in ("aws_vpc", "aws_subnet", "aws_internet_gateway", "aws_route_table", "aws_route") if planned(plan, t)}
    check(not made, "no network resources created", made)
    vpc_ids = {r["change"]["after"]["vpc_id"] for r in planned(plan, "aws_security_group")}
    check(vpc_ids == {vpc}, "security groups in the given VPC", vpc_ids)
    rules = [r["change"]["after"] for r in planned(plan, "aws_vpc_security_group_ingress_rule")]
    inside = sorted(r["from_port"] for r in rules if r["cidr_ipv4"] == EXISTING_CIDR)
    check(inside == sorted([APPREPO_API, BEACON_API, BEACON_CONTROL, MAESTRO_STATUS]),
          f"control ports open to the existing VPC's CIDR ({EXISTING_CIDR})", inside)
    web = [r["change"]["after"]["subnet_id"] for r in planned(plan, "aws_instance")
           if r["change"]["after"]["tags"]["PlatformxRole"] == "web"]
    check(sorted(set(web)) == sorted(subnets), "web servers spread over the given subnets", web)
    lb = planned(plan, "aws_lb")
    check(len(lb) == 1 and sorted(lb[0]["change"]["after"]["subnets"]) == sorted(subnets), "load balancer in the given subnets")
    sse = planned(plan, "aws_s3_bucket_server_side_encryption_configuration")[0]["change"]["after"]["rule"][0]
    by_default = sse["apply_server_side_encryption_by_default"][0]
    check((by_default["sse_algorithm"], by_default["kms_master_key_id"], sse["bucket_key_enabled"]) == ("aws:kms", key, True),
          "bundles_kms_key_arn: SSE-KMS with that key and a bucket key", sse)


# --- present: what moto holds after the apply --------------------------------------------------

def cmd_present(outputs_json, zones_file):
    out = {k: v["value"] for k, v in json.loads(Path(outputs_json).read_text()).items()}
    prefix = TFVARS["name_prefix"]
    admin = sorted(TFVARS["admin_cidrs"])
    s3, ec2, iam, elb = client("s3"), client("ec2"), client("iam"), client("elbv2")

    print("bundles bucket:")
    bucket = out["bundles_bucket"]["name"]
    bucket_arn = out["bundles_bucket"]["arn"]
    check(bucket.startswith(f"{prefix}-bundles-"), f"bucket {bucket} named after the prefix")
    pab = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    check(all(pab.get(k) is True for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")),
          "public access block: all four on", pab)
    check(s3.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled", "versioning enabled")
    enc = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    check(enc[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256", "SSE AES256", enc)
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    enabled = [r for r in rules if r["Status"] == "Enabled"]
    noncurrent = [r["NoncurrentVersionExpiration"]["NoncurrentDays"] for r in enabled if "NoncurrentVersionExpiration" in r]
    check(noncurrent == [TFVARS["bundles_noncurrent_version_days"]],
          f"noncurrent versions expire after {TFVARS['bundles_noncurrent_version_days']} days", rules)
    abort = [r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for r in enabled if "AbortIncompleteMultipartUpload" in r]
    check(abort == [1], "incomplete multipart uploads aborted after 1 day", rules)
    own = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    check(own == [{"ObjectOwnership": "BucketOwnerEnforced"}], "ACLs off (BucketOwnerEnforced)", own)
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    deny = [s for s in policy["Statement"] if s["Effect"] == "Deny"
            and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    check(len(deny) == 1, "bucket policy refuses plain HTTP", policy)
    check(has_cluster_tags(tags_of(s3.get_bucket_tagging(Bucket=bucket)["TagSet"])), "bucket tagged")

    print("IAM:")
    role_name = out["control_role_arn"].split("/")[-1]
    role = iam.get_role(RoleName=role_name)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    if isinstance(trust, str):
        trust = json.loads(trust)
    principals = [s["Principal"].get("Service") for s in trust["Statement"]]
    check(principals == ["ec2.amazonaws.com"], "role assumable by EC2 only", principals)
    check(iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == [], "no managed policies attached")
    names = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    check(names == ["bundles-bucket"], "one inline policy", names)
    doc = iam.get_role_policy(RoleName=role_name, PolicyName="bundles-bucket")["PolicyDocument"]
    if isinstance(doc, str):
        doc = json.loads(doc)
    statements = doc["Statement"]
    resources = set()
    actions = set()
    for s in statements:
        check(s["Effect"] == "Allow", f"statement {s.get('Sid')} allows")
        resources.update([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
        actions.update([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    check(resources == {bucket_arn, f"{bucket_arn}/*"}, "policy names only the bucket and its objects", resources)
    check(all(a.startswith("s3:") and "*" not in a for a in actions), "only named s3: actions, no wildcards", actions)
    needed = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:AbortMultipartUpload"}
    check(needed <= actions, "apprepo's actions all granted", needed - actions)
    on_bucket = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
                 if s["Resource"] in (bucket_arn, [bucket_arn])}
    check("s3:GetObject" not in on_bucket and "s3:ListBucket" in on_bucket,
          "bucket-level actions on the bucket ARN, object actions on bucket/*")
    profiles = iam.list_instance_profiles_for_role(RoleName=role_name)["InstanceProfiles"]
    check(len(profiles) == 1, "one instance profile for the role")
    profile_arn = profiles[0]["Arn"] if profiles else None

    print("network:")
    vpc_id = out["vpc_id"]
    vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
    check(vpc["CidrBlock"] == VPC_CIDR, f"VPC {VPC_CIDR}", vpc["CidrBlock"])
    check(has_cluster_tags(tags_of(vpc.get("Tags"))), "VPC tagged", vpc.get("Tags"))
    subnets = ec2.describe_subnets(SubnetIds=out["subnet_ids"])["Subnets"]
    check(len({s["AvailabilityZone"] for s in subnets}) == 2, "two subnets in two AZs")
    check(all(s["MapPublicIpOnLaunch"] and ipaddress.ip_network(s["CidrBlock"]).subnet_of(ipaddress.ip_network(VPC_CIDR))
              for s in subnets), "subnets public, inside the VPC")
    igws = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])["InternetGateways"]
    check(len(igws) == 1, "an internet gateway attached")
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
    default_routes = [r for t in tables for r in t["Routes"]
                      if r.get("DestinationCidrBlock") == "0.0.0.0/0" and igws and r.get("GatewayId") == igws[0]["InternetGatewayId"]]
    associated = {a.get("SubnetId") for t in tables for a in t.get("Associations", [])}
    check(len(default_routes) == 1 and set(out["subnet_ids"]) <= associated, "subnets route 0.0.0.0/0 to the gateway")

    print("security groups:")
    sgs = out["security_group_ids"]

    def ingress(group_id):
        rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [group_id]}])["SecurityGroupRules"]
        return sorted((r["FromPort"], r["ToPort"], r.get("CidrIpv4") or r.get("ReferencedGroupInfo", {}).get("GroupId"))
                      for r in rules if not r["IsEgress"]), rules

    control_in, _ = ingress(sgs["control"])
    want = sorted(
        [(APPREPO_API, APPREPO_API, VPC_CIDR), (BEACON_API, BEACON_API, VPC_CIDR), (BEACON_CONTROL, BEACON_CONTROL, VPC_CIDR)]
        + [(p, p, c) for c in admin for p in (22, APPREPO_API, BEACON_API)]
    )
    check(control_in == want, "control: 7070/7080/7443 from the VPC; 22/7070/7080 from admin_cidrs; nothing else", control_in)
    web_in, _ = ingress(sgs["web"])
    want = sorted([(80, 80, "0.0.0.0/0"), (443, 443, "0.0.0.0/0"), (MAESTRO_STATUS, MAESTRO_STATUS, VPC_CIDR)]
                  + [(22, 22, c) for c in admin])
    check(web_in == want, "web: 80/443 from anywhere; 7090 from the VPC; 22 from admin_cidrs; nothing else", web_in)
    ssh_sources = sorted(src for port, _, src in control_in + web_in if port == 22)
    check(ssh_sources == sorted(admin * 2), "SSH only from admin_cidrs", ssh_sources)
    api_in, api_rules = ingress(sgs["api_lb"])
    api_out = [(r["FromPort"], r.get("ReferencedGroupInfo", {}).get("GroupId", "").split("/")[-1]) for r in api_rules if r["IsEgress"]]
    edge.api_load_balancer_rules(check, api_in, api_out, sgs["control"], admin)
    lb_in, lb_rules = ingress(sgs["lb"])
    lb_out = [(r["FromPort"], r.get("ReferencedGroupInfo", {}).get("GroupId", "").split("/")[-1]) for r in lb_rules if r["IsEgress"]]
    edge.load_balancer_rules(check, lb_in, lb_out, sgs["web"])
    for name, gid in sgs.items():
        group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
        check(group["VpcId"] == vpc_id and has_cluster_tags(tags_of(group.get("Tags"))), f"{name} group in the VPC, tagged")

    print("instances:")
    reservations = ec2.describe_instances(Filters=[
        {"Name": "tag:Cluster", "Values": [prefix]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ])["Reservations"]
    instances = {tags_of(i["Tags"])["Name"]: i for r in reservations for i in r["Instances"]}
    control = sorted(n for n, i in instances.items() if tags_of(i["Tags"]).get("PlatformxRole") == "control")
    web = sorted(n for n, i in instances.items() if tags_of(i["Tags"]).get("PlatformxRole") == "web")
    check(control == [f"{prefix}-control-{i + 1}" for i in range(TFVARS["control_count"])], "control hosts", control)
    check(web == [f"{prefix}-web-{i + 1}" for i in range(TFVARS["web_count"])], "web servers", web)
    ami = newest_debian_ami()
    check({i["ImageId"] for i in instances.values()} == {ami}, f"every host from the newest Debian 12 amd64 AMI ({ami})",
          {i["ImageId"] for i in instances.values()})
    check({i["InstanceType"] for i in instances.values()} == {"t3.small"}, "t3.small")
    keys = {i.get("KeyName") for i in instances.values()}
    check(len(keys) == 1 and next(iter(keys), "").startswith(f"{prefix}-admin-"), "the admin key pair on every host", keys)
    check(all(has_cluster_tags(tags_of(i["Tags"])) for i in instances.values()), "instances tagged")
    for name, inst in sorted(instances.items()):
        role = tags_of(inst["Tags"])["PlatformxRole"]
        groups = {g["GroupId"] for n in inst["NetworkInterfaces"] for g in n["Groups"]}
        check(groups == {sgs[role]}, f"{name} in the {role} group only", groups)
        check(inst["SubnetId"] in out["subnet_ids"] and inst.get("PublicIpAddress"), f"{name} in a public subnet with a public IP")
        profile = inst.get("IamInstanceProfile", {}).get("Arn")
        check(profile == (profile_arn if role == "control" else None), f"{name}: instance profile {'the control role' if role == 'control' else 'none'}", profile)
        vol_id = inst["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        vol = ec2.describe_volumes(VolumeIds=[vol_id])["Volumes"][0]
        size = TFVARS.get(f"{role}_root_volume_size", 20)
        check(vol["Size"] == size and vol["VolumeType"] == "gp3" and vol["Encrypted"], f"{name}: {size} GiB gp3 encrypted root volume",
              (vol["Size"], vol["VolumeType"], vol["Encrypted"]))
    web_subnets = {instances[n]["SubnetId"] for n in web}
    check(len(web_subnets) == 2, "web servers spread over both subnets")
    control_azs = sorted(instances[n]["Placement"]["AvailabilityZone"] for n in control)
    check(len(set(control_azs)) == 2, "control hosts in two availability zones", control_azs)

    print("control API load balancer:")
    api_lb = edge.api_load_balancer(check, elb, out, [instances[n] for n in control], has_cluster_tags)
    want_urls = [out["beacon_url"]] + [f"https://{instances[n]['PublicIpAddress']}:{BEACON_API}" for n in control]
    check(out["beacon_urls"] == want_urls, "beacon_urls: beacon_url, then every control host's Beacon", out["beacon_urls"])

    print("load balancer:")
    lb = edge.load_balancer(check, elb, out, sgs, [instances[n]["InstanceId"] for n in web], has_cluster_tags)

    print("DNS records:")
    zone_id = Path(zones_file).read_text().split()[0]
    if lb:
        edge.dns_records(check, client("route53"), out, TFVARS, zone_id, lb, api_lb)

    print("Ansible inventory:")
    inv = yaml.safe_load(out["ansible_inventory"])
    groups = inv["all"]["children"]
    check(sorted(groups) == ["beacon", "builders", "repository", "webservers"], "groups repository, beacon, webservers, builders", sorted(groups))
    check(sorted(groups["repository"]["hosts"]) == control, "repository: every control host")
    check(sorted(groups["beacon"]["hosts"]) == control, "beacon: every control host")
    check(sorted(groups["webservers"]["hosts"]) == web, "webservers: every web server")
    # The builders group only names its hosts: their addresses are the web servers'.
    check(groups["builders"]["hosts"] == {web[0]: {}}, "builders: the first web server, by name only", groups["builders"]["hosts"])
    for group_name, group in groups.items():
        if group_name == "builders":
            continue
        for name, hv in group["hosts"].items():
            inst = instances.get(name, {})
            check(hv == {"ansible_host": inst.get("PublicIpAddress"), "ansible_user": "admin", "private_ip": inst.get("PrivateIpAddress"),
                         "px_instance_id": inst.get("InstanceId")},
                  f"{name}: public and private IP of the instance, user admin, its instance id (for its host keys)", hv)
    repo_vars = groups["repository"].get("vars", {})
    check(repo_vars == {"platformx_s3_bucket": bucket, "platformx_s3_region": TFVARS["region"]}, "repository vars: bucket and region", repo_vars)
    first = instances.get(f"{prefix}-control-1", {}).get("PrivateIpAddress")
    all_vars = inv["all"]["vars"]
    edge.inventory_vars(check, all_vars, TFVARS, out["api_load_balancer_dns_name"])
    check(all_vars.get("platformx_beacon_address") == f"{first}:{BEACON_CONTROL}"
          and all_vars.get("platformx_repository_url") == f"https://{first}:{APPREPO_API}",
          "Beacon and apprepo addresses are control-1's private IP", all_vars)


# --- ansible: the generated inventory through Ansible itself -----------------------------------

REPO = HERE.parents[1]
SITE = REPO / "ansible" / "site.yml"
ROLES = REPO / "ansible" / "roles"
# One Ansible command that only reads the inventory and the playbook (no host is contacted).
ANSIBLE_TIMEOUT_S = 120


def ansible(*args):
    proc = subprocess.run(
        list(args), cwd=REPO / "ansible", capture_output=True, text=True, timeout=ANSIBLE_TIMEOUT_S,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def plays_and_hosts(listing):
    """`ansible-playbook --list-hosts` output → {play name: [hosts]}."""
    plays, current = {}, None
    for line in listing.splitlines():
        stripped = line.strip()
        if stripped.startswith("play #"):
            current = stripped.split(": ", 1)[1].split("\t")[0].strip()
            plays[current] = []
        elif current and line.startswith("      ") and stripped:
            plays[current].append(stripped)
    return plays


def cmd_ansible(outputs_json):
    out = {k: v["value"] for k, v in json.loads(Path(outputs_json).read_text()).items()}
    prefix = TFVARS["name_prefix"]
    control = [f"{prefix}-control-{i}" for i in range(1, TFVARS["control_count"] + 1)]
    web = [f"{prefix}-web-{i}" for i in range(1, TFVARS["web_count"] + 1)]
    inventory = Path(outputs_json).with_name("inventory.yml")
    inventory.write_text(out["ansible_inventory"])
    print("the inventory through Ansible (nothing contacted):")

    # Ansible reads it as Terraform meant it: every host with its addresses and user.
    listed = json.loads(ansible("ansible-inventory", "-i", str(inventory), "--list"))
    hostvars = listed["_meta"]["hostvars"]
    check(sorted(hostvars) == sorted(control + web), "ansible-inventory reads every instance", sorted(hostvars))
    check(all(v.get("ansible_user") == "admin" and v.get("ansible_host") and v.get("private_ip") for v in hostvars.values()),
          "every host has ansible_host, ansible_user admin and private_ip")

    # site.yml run with it: each play gets the hosts its role is for.
    plays = plays_and_hosts(ansible("ansible-playbook", "-i", str(inventory), str(SITE), "--list-hosts"))
    expected = {
        "Make the cluster's secrets on the controller": control + web,
        "Prepare every Platform.X host": control + web,
        "Run apprepo on the repository hosts": control,
        "Run Beacon on the beacon hosts": control,
        "Fill the runtimes directory on the build nodes": web[:1],
        "Run Maestro on every web server and build node": web,
    }
    check(set(plays) == set(expected), "site.yml's plays", sorted(plays))
    for play, hosts in expected.items():
        check(sorted(plays.get(play, [])) == sorted(hosts), f"site.yml: {play}: {len(hosts)} host(s)", plays.get(play))

    # The variables Terraform sets are the ones the roles read (a renamed role variable would
    # otherwise be ignored without a word), and resolve on the hosts that use them.
    inv = yaml.safe_load(out["ansible_inventory"])
    set_vars = set(inv["all"].get("vars", {}))
    for group in inv["all"]["children"].values():
        set_vars |= set(group.get("vars", {}))
    role_text = "\n".join(p.read_text() for p in ROLES.rglob("*") if p.is_file() and p.suffix in (".yml", ".j2"))
    # scripts/provision reads the host-key variables (px_aws_region, px_instance_id) itself.
    provision_text = (REPO / "ansible" / "provision.py").read_text()
    for name in sorted(set_vars | {"private_ip"}):
        if name.startswith("px_aws_"):
            check(re.search(rf"\b{re.escape(name)}\b", provision_text) is not None, f"scripts/provision reads {name}")
        else:
            check(re.search(rf"\b{re.escape(name)}\b", role_text) is not None, f"a role reads {name}")
    check(inv["all"]["vars"].get("px_aws_region") == TFVARS["region"], "px_aws_region is the cluster's region", inv["all"]["vars"].get("px_aws_region"))
    bucket = out["bundles_bucket"]["name"]
    for name in control:
        check(hostvars[name].get("platformx_s3_bucket") == bucket,
              f"{name}: apprepo's host gets the bundles bucket", hostvars[name].get("platformx_s3_bucket"))
    first = hostvars[control[0]]["private_ip"]
    check(all(hostvars[n].get("platformx_beacon_address") == f"{first}:{BEACON_CONTROL}" for n in web),
          "web servers link to Beacon at control-1's private IP", {n: hostvars[n].get("platformx_beacon_address") for n in web})


# --- clean: a second plan right after the apply ------------------------------------------------

# Differences that come from moto, not from the configuration (see README.md, "Checks"):
#  - instances started with a network interface spec (associate_public_ip_address) report
#    their security groups on the interface only, so the provider reads an empty
#    vpc_security_group_ids;
#  - a rule that references a group reads it back as "<account>/<group id>", without its
#    description.
def moto_quirk(rc):
    before, after = rc["change"]["before"], rc["change"]["after"]
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    if rc["type"] == "aws_instance":
        return changed == {"vpc_security_group_ids"} and not before["vpc_security_group_ids"]
    if rc["type"] == "aws_vpc_security_group_egress_rule":
        return (
            changed <= {"referenced_security_group_id", "description"}
            and before["referenced_security_group_id"].split("/")[-1] == after["referenced_security_group_id"]
            and (before.get("description") or after.get("description")) == after.get("description")
        )
    return False


def cmd_clean(plan_json):
    plan = json.loads(Path(plan_json).read_text())
    print("second plan:")
    changes = [rc for rc in plan.get("resource_changes", []) if rc["change"]["actions"] != ["no-op"]]
    quirks = [rc["address"] for rc in changes if rc["change"]["actions"] == ["update"] and moto_quirk(rc)]
    real = [(rc["address"], rc["change"]["actions"]) for rc in changes if rc["address"] not in quirks]
    check(not real, "no changes after apply" + (f" (besides {len(quirks)} known moto read-back quirks)" if quirks else ""), real)


def cmd_provisioned(record_file, count, release):
    print("provisioning:")
    provision.runs(check, record_file, count, TFVARS, release)


def cmd_new_release(plan_json):
    print("plan after a new release:")
    provision.only_provision_replaced(check, json.loads(Path(plan_json).read_text()), moto_quirk)


# --- gone: after the destroy --------------------------------------------------------------------

def cmd_gone(outputs_json, zones_file):
    out = {k: v["value"] for k, v in json.loads(Path(outputs_json).read_text()).items()}
    prefix = TFVARS["name_prefix"]
    s3, ec2, iam, elb = client("s3"), client("ec2"), client("iam"), client("elbv2")
    print("after destroy:")
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check(out["bundles_bucket"]["name"] not in buckets, "bucket gone", buckets)
    live = [i["InstanceId"] for r in ec2.describe_instances(Filters=[{"Name": "tag:Cluster", "Values": [prefix]}])["Reservations"]
            for i in r["Instances"] if i["State"]["Name"] != "terminated"]
    check(not live, "instances terminated", live)
    check(not ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [out["vpc_id"]]}])["Vpcs"], "VPC gone")
    check(not ec2.describe_subnets(Filters=[{"Name": "subnet-id", "Values": out["subnet_ids"]}])["Subnets"], "subnets gone")
    groups = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"].startswith(f"{prefix}-")]
    check(not groups, "security groups gone", groups)
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"].startswith(f"{prefix}-")]
    check(not keys, "key pair gone", keys)
    vols = [v["VolumeId"] for v in ec2.describe_volumes()["Volumes"] if has_cluster_tags(tags_of(v.get("Tags")))]
    check(not vols, "root volumes gone", vols)
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(f"{prefix}-")]
    check(not roles, "IAM role gone", roles)
    profiles = [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
                if p["InstanceProfileName"].startswith(f"{prefix}-")]
    check(not profiles, "instance profile gone", profiles)
    check(not elb.describe_load_balancers()["LoadBalancers"], "load balancer gone")
    check(not elb.describe_target_groups()["TargetGroups"], "target groups gone")
    zone_id = Path(zones_file).read_text().split()[0]
    left = [r["Name"] for r in client("route53").list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
            if r["Type"] not in ("NS", "SOA")]
    check(not left, "DNS records gone, the hosted zone kept", left)


def main():
    commands = {"defaults": 1, "arm64": 1, "make-zones": 1, "dns-direct": 1, "make-vpc": 1, "existing": 2, "present": 2, "ansible": 1,
                "clean": 1, "provisioned": 3, "new-release": 1, "gone": 2}
    if len(sys.argv) < 2 or commands.get(sys.argv[1]) != len(sys.argv) - 2:
        sys.exit(__doc__)
    try:
        globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
    except Exception as e:  # an API call or a missing key: a failure, and keep the count
        import traceback
        traceback.print_exc(file=sys.stdout)
        check(False, f"{sys.argv[1]} stopped early", repr(e))
    print(f"{sys.argv[1]}: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
