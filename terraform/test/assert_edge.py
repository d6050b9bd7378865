"""The cluster's edge, for assert_cluster.py: the load balancer, the DNS records, the domain and
the ACME settings, in plans and as moto holds them after the apply.

Each function takes the `check(ok, what, detail)` of assert_cluster.py, so every result is
counted there. The cluster's expectations come from moto.tfvars.json (passed in as `tfvars`).
"""

from pathlib import Path

# Maestro's proxy ports, passed through by the load balancer; its health check's port and the
# answers that mean "the proxy is up" (modules/load_balancer).
PROXY_PORTS = {"http": 80, "https": 443}
HEALTH_CHECK = ("HTTP", "80", "/", "200-499")
API_LABELS = {"beacon": "beacon", "apprepo": "apprepo"}
# The control API load balancer (several control hosts): each API's port, and the health check
# that decides where it routes: every apprepo that answers /healthz, only the Beacon whose
# /v1/health/active answers 200 (the active one; a standby answers 503).
API_PORTS = {"apprepo": 7070, "beacon": 7080}
API_HEALTH_CHECKS = {
    "apprepo": ("HTTPS", "7070", "/healthz", "200"),
    "beacon": ("HTTPS", "7080", "/v1/health/active", "200"),
}
# The zones make-zones creates in moto: the one the test domains are in, a private one for the
# same name, and one that holds none of them.
PUBLIC_ZONE = "example.com"
OTHER_ZONE = "example.org"
DNS_TTL = 300


def planned(plan, rtype):
    return [r for r in plan["resource_changes"] if r["type"] == rtype and "create" in r["change"]["actions"]]


def make_zones(check, route53, ec2, region, ids_file):
    """Hosted zones a user would already have: writes the public, private and other zone ids."""
    vpc = ec2.create_vpc(CidrBlock="10.79.0.0/16")["Vpc"]["VpcId"]

    def zone(name, private):
        args = {"Name": name, "CallerReference": f"terraform-check-{name}-{private}"}
        if private:
            args["HostedZoneConfig"] = {"PrivateZone": True, "Comment": "a private zone"}
            args["VPC"] = {"VPCRegion": region, "VPCId": vpc}
        return route53.create_hosted_zone(**args)["HostedZone"]["Id"].split("/")[-1]

    ids = [zone(PUBLIC_ZONE, False), zone(PUBLIC_ZONE, True), zone(OTHER_ZONE, False)]
    Path(ids_file).write_text("\n".join(ids) + "\n")
    check(len(set(ids)) == 3, f"made hosted zones {PUBLIC_ZONE} (public and private) and {OTHER_ZONE}", ids)


def plan_without_load_balancer(check, plan, domain):
    """create_dns_records with no load balancer: A records of the web servers' IPs."""
    changes = planned(plan, "aws_route53_record")
    records = {r["change"]["after"]["name"]: r for r in changes}
    want = {f"*.{domain}", domain} | {f"{label}.{domain}" for label in API_LABELS.values()}
    check(set(records) == want, "records for *.domain, domain, beacon.domain and apprepo.domain", sorted(records))
    after = [r["change"]["after"] for r in changes]
    check(all(a["type"] == "A" and a["ttl"] == DNS_TTL and not a.get("alias") for a in after),
          f"all A records with a TTL of {DNS_TTL} s, no alias", after)
    check(not planned(plan, "aws_lb"), "no load balancer")
    # The addresses are known only after the apply; the configuration says where they come from.
    call = plan["configuration"]["root_module"]["module_calls"]["dns"]["expressions"]
    web_refs = call["web_public_ips"].get("references", [])
    check("module.instances.web_hosts" in web_refs and all(r["change"]["after_unknown"].get("records") for r in changes),
          "the apps' records hold the web servers' public IPs, known after the apply", web_refs)


def load_balancer(check, elb, out, sgs, web_instance_ids, tags_ok):
    """The NLB: TCP 80 and 443 through to every web server, health-checked over plain HTTP.
    Returns it as elbv2 describes it (None if missing)."""
    lbs = [lb for lb in elb.describe_load_balancers()["LoadBalancers"] if lb["DNSName"] == out["load_balancer_dns_name"]]
    check(len(lbs) == 1, "one load balancer, its DNS name the output")
    if not lbs:
        return None
    lb = lbs[0]
    # `internal = false` sends no Scheme, which AWS takes as internet-facing; moto then stores
    # none, so a missing Scheme is read as the default.
    check(lb.get("Scheme", "internet-facing") == "internet-facing" and lb["Type"] == "network",
          "internet-facing network LB", (lb.get("Scheme"), lb["Type"]))
    check(lb.get("SecurityGroups") == [sgs["lb"]], "in the load balancer group", lb.get("SecurityGroups"))
    check(sorted(z["SubnetId"] for z in lb["AvailabilityZones"]) == sorted(out["subnet_ids"]), "in both subnets")
    lb_tags = {t["Key"]: t["Value"] for t in elb.describe_tags(ResourceArns=[lb["LoadBalancerArn"]])["TagDescriptions"][0]["Tags"]}
    check(tags_ok(lb_tags), "load balancer tagged", lb_tags)
    attrs = {a["Key"]: a["Value"] for a in elb.describe_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"])["Attributes"]}
    check(attrs.get("load_balancing.cross_zone.enabled") == "true", "cross-zone load balancing on", attrs)

    listeners = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    seen = sorted((li["Port"], li["Protocol"], li["DefaultActions"][0]["Type"]) for li in listeners)
    check(seen == [(80, "TCP", "forward"), (443, "TCP", "forward")],
          "listeners TCP 80 and TCP 443, forwarding (no certificate, no TLS on the load balancer)", seen)
    # (moto gives every listener a default SslPolicy, so the certificates alone are compared.)
    check(not any(li.get("Certificates") for li in listeners), "no listener holds a certificate",
          [li.get("Certificates") for li in listeners])
    tgs = {tg["TargetGroupArn"]: tg for tg in elb.describe_target_groups(LoadBalancerArn=lb["LoadBalancerArn"])["TargetGroups"]}
    forwards = {li["Port"]: li["DefaultActions"][0]["TargetGroupArn"] for li in listeners}
    for name, port in PROXY_PORTS.items():
        tg = tgs.get(forwards.get(port))
        if not check(tg is not None, f"listener {port} forwards to a target group of this load balancer"):
            continue
        check((tg["Port"], tg["Protocol"]) == (port, "TCP"), f"{name} target group: TCP {port}", (tg["Port"], tg["Protocol"]))
        health = (tg["HealthCheckProtocol"], tg["HealthCheckPort"], tg.get("HealthCheckPath"), tg.get("Matcher", {}).get("HttpCode"))
        check(health == HEALTH_CHECK, f"{name} target group: health check GET / on port 80 over HTTP, 200-499 (no certificate needed)",
              health)
        targets = sorted((t["Target"]["Id"], t["Target"]["Port"])
                         for t in elb.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])["TargetHealthDescriptions"])
        check(targets == sorted((i, port) for i in web_instance_ids),
              f"{name} target group: every web server on port {port}, and only they", targets)
    return lb


def api_load_balancer(check, elb, out, control_instances, tags_ok):
    """The control API load balancer: apprepo's and Beacon's APIs on every control host, Beacon
    routed only to the active one. Returns it as elbv2 describes it (None if missing)."""
    lbs = [lb for lb in elb.describe_load_balancers()["LoadBalancers"] if lb["DNSName"] == out["api_load_balancer_dns_name"]]
    check(len(lbs) == 1, "one API load balancer, its DNS name the output api_load_balancer_dns_name", out.get("api_load_balancer_dns_name"))
    if not lbs:
        return None
    lb = lbs[0]
    check(lb.get("Scheme", "internet-facing") == "internet-facing" and lb["Type"] == "network",
          "API load balancer: internet-facing network LB", (lb.get("Scheme"), lb["Type"]))
    check(lb.get("SecurityGroups") == [out["security_group_ids"]["api_lb"]], "in the API load balancer group", lb.get("SecurityGroups"))
    zones = sorted((z["ZoneName"], z["SubnetId"]) for z in lb["AvailabilityZones"])
    check(len({z for z, _ in zones}) == 2 and sorted(s for _, s in zones) == sorted(out["subnet_ids"]),
          "API load balancer in both subnets, two AZs", zones)
    lb_tags = {t["Key"]: t["Value"] for t in elb.describe_tags(ResourceArns=[lb["LoadBalancerArn"]])["TagDescriptions"][0]["Tags"]}
    check(tags_ok(lb_tags), "API load balancer tagged", lb_tags)
    listeners = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    seen = sorted((li["Port"], li["Protocol"]) for li in listeners)
    check(seen == sorted((p, "TCP") for p in API_PORTS.values()), "API listeners TCP 7070 and 7080 (TLS passes through to the services)", seen)
    check(not any(li.get("Certificates") for li in listeners), "no API listener holds a certificate")
    tgs = {tg["TargetGroupArn"]: tg for tg in elb.describe_target_groups(LoadBalancerArn=lb["LoadBalancerArn"])["TargetGroups"]}
    forwards = {li["Port"]: li["DefaultActions"][0]["TargetGroupArn"] for li in listeners}
    control_ids = sorted(i["InstanceId"] for i in control_instances)
    for api, port in API_PORTS.items():
        tg = tgs.get(forwards.get(port))
        if not check(tg is not None, f"listener {port} forwards to {api}'s target group"):
            continue
        health = (tg["HealthCheckProtocol"], tg["HealthCheckPort"], tg.get("HealthCheckPath"), tg.get("Matcher", {}).get("HttpCode"))
        check(health == API_HEALTH_CHECKS[api], f"{api} target group: health check {' '.join(API_HEALTH_CHECKS[api])}", health)
        targets = sorted((t["Target"]["Id"], t["Target"]["Port"])
                         for t in elb.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])["TargetHealthDescriptions"])
        check(targets == [(i, port) for i in control_ids], f"{api} target group: every control host on port {port}", targets)
    return lb


def api_load_balancer_rules(check, api_in, api_out, control_group, admin_cidrs):
    """The API load balancer's group: 7070 and 7080 from admin_cidrs, out to the control hosts' only."""
    want = sorted((p, p, c) for c in admin_cidrs for p in API_PORTS.values())
    check(api_in == want, "API load balancer: 7070 and 7080 from admin_cidrs only", api_in)
    check(sorted(api_out) == sorted((p, control_group) for p in API_PORTS.values()),
          "API load balancer: out to the control hosts' 7070 and 7080 only", api_out)


def load_balancer_rules(check, lb_in, lb_out, web_group):
    """The load balancer's group: 80 and 443 in from anywhere, out to the web servers' only."""
    check(lb_in == [(80, 80, "0.0.0.0/0"), (443, 443, "0.0.0.0/0")], "load balancer: 80 and 443 from anywhere", lb_in)
    check(sorted(lb_out) == [(80, web_group), (443, web_group)], "load balancer: out to the web servers' 80 and 443 only", lb_out)


def dns_records(check, route53, out, tfvars, zone_id, lb, api_lb):
    """The records create_dns_records made, read back from Route 53 (a cluster with several
    control hosts, so the API names follow the API load balancer)."""
    domain = tfvars["domain"]
    sets = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    records = {r["Name"].rstrip(".").replace("\\052", "*"): r for r in sets if r["Type"] == "A"}
    for name in (f"*.{domain}", domain):
        r = records.get(name, {})
        target = r.get("AliasTarget", {})
        check(target.get("DNSName", "").rstrip(".").lower() == lb["DNSName"].lower() and target.get("HostedZoneId") == lb["CanonicalHostedZoneId"],
              f"{name}: alias to the load balancer", r)
    for service, label in API_LABELS.items():
        name = f"{label}.{domain}"
        r = records.get(name, {})
        target = r.get("AliasTarget", {})
        check(api_lb is not None and target.get("DNSName", "").rstrip(".").lower() == api_lb["DNSName"].lower()
              and target.get("HostedZoneId") == api_lb["CanonicalHostedZoneId"],
              f"{name}: alias to the API load balancer", r)
    want = {"apps": sorted([f"*.{domain}", domain]), "apis": {s: f"{label}.{domain}" for s, label in API_LABELS.items()}}
    got = dict(out["dns_records"], apps=sorted(out["dns_records"]["apps"]))
    check(got == want, "dns_records output names them", out["dns_records"])
    check(out["beacon_url"] == f"https://beacon.{domain}:7080" and out["apprepo_url"] == f"https://apprepo.{domain}:7070",
          "beacon_url and apprepo_url use the API names", (out["beacon_url"], out["apprepo_url"]))
    check(out["domain"] == domain, "domain output", out["domain"])


def inventory_vars(check, all_vars, tfvars, api_lb_name):
    """What the inventory tells the roles about the domain, ACME and the API names (the
    certificates name the API load balancer too: em may reach it by that name)."""
    domain = tfvars["domain"]
    want = {
        "px_beacon_domain": domain,
        "px_acme_directory_url": tfvars["acme_directory_url"],
        "px_acme_email": tfvars["acme_email"],
        "pki_beacon_extra_names": [f"beacon.{domain}", api_lb_name],
        "pki_apprepo_extra_names": [f"apprepo.{domain}", api_lb_name],
        "pki_em_beacon_url": f"https://beacon.{domain}:7080",
        "pki_em_apprepo_url": f"https://apprepo.{domain}:7070",
    }
    got = {k: all_vars.get(k) for k in want}
    check(got == want, "inventory: Beacon's domain, the ACME settings, the API names for the certificates and em", got)


def outputs_value(plan, name):
    return plan["planned_values"]["outputs"].get(name, {}).get("value")


def plan_defaults(check, plan):
    """The defaults plan: the domain reaches the inventory, ACME is Let's Encrypt production."""
    variables = {k: v["value"] for k, v in plan["variables"].items()}
    check(variables["acme_directory_url"] == "https://acme-v02.api.letsencrypt.org/directory",
          "ACME directory defaults to Let's Encrypt production", variables["acme_directory_url"])
    check(variables["create_dns_records"] is False and not planned(plan, "aws_route53_record"), "no DNS records by default")
    check(len(planned(plan, "aws_lb")) == 0 and outputs_value(plan, "api_load_balancer_dns_name") is None,
          "one control host: no API load balancer")
    outputs = plan["planned_values"]["outputs"]
    check(outputs["domain"]["value"] == variables["domain"], "the domain output is the variable", outputs["domain"])
