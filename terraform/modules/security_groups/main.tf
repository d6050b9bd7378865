# modules/security_groups: who may reach which port.
#
#   web servers    80, 443 from anywhere (Maestro's proxy); 7090 (Maestro status) from the VPC;
#                  22 from admin_cidrs
#   control hosts  7070 (apprepo API) and 7080 (Beacon API) from the VPC and admin_cidrs;
#                  7443 (Beacon control links, TLS) from the VPC; 22 from admin_cidrs
#   load balancer  80, 443 from anywhere, out to the web servers' 80 and 443 only
#   API load balancer (several control hosts)  7070, 7080 from admin_cidrs, out to the
#                  control hosts' 7070 and 7080 only
#
# The load balancer passes TCP through and keeps the client's address, so the web servers
# see clients, not the load balancer: their 80 and 443 stay open to anywhere.
#
# The ports are the services' defaults (crates/*/src/config.rs); the services themselves bind
# loopback by default, so Ansible must set them to listen on the host's addresses.

locals {
  # apprepo `listen`: uploads from `em`, bundle downloads by Maestros, reads by Beacon.
  apprepo_api_port = 7070
  # Beacon `http_listen`: `em` (status, logs, rollouts), the status page.
  beacon_api_port = 7080
  # Beacon `control_listen`: TLS links from every Maestro and apprepo.
  beacon_control_port = 7443
  # Maestro `status_listen`: /healthz, /metrics, /v1/state, for monitoring inside the VPC.
  maestro_status_port = 7090
  # Maestro's proxy: plain HTTP (and ACME's HTTP-01 challenges) and HTTPS (TLS-ALPN-01 too).
  proxy_ports = { http = 80, https = 443 }

  control_rules = merge(
    {
      "apprepo-api-from-vpc"    = { port = local.apprepo_api_port, cidr = var.vpc_cidr, what = "apprepo API from the VPC" }
      "beacon-api-from-vpc"     = { port = local.beacon_api_port, cidr = var.vpc_cidr, what = "Beacon API from the VPC" }
      "beacon-control-from-vpc" = { port = local.beacon_control_port, cidr = var.vpc_cidr, what = "Beacon control links from the VPC" }
    },
    { for c in var.admin_cidrs : "apprepo-api-from-${c}" => { port = local.apprepo_api_port, cidr = c, what = "apprepo API from an admin" } },
    { for c in var.admin_cidrs : "beacon-api-from-${c}" => { port = local.beacon_api_port, cidr = c, what = "Beacon API from an admin" } },
    { for c in var.admin_cidrs : "ssh-from-${c}" => { port = 22, cidr = c, what = "SSH from an admin" } },
  )

  web_rules = merge(
    {
      "http-from-anywhere"      = { port = local.proxy_ports.http, cidr = "0.0.0.0/0", what = "HTTP to Maestro's proxy" }
      "https-from-anywhere"     = { port = local.proxy_ports.https, cidr = "0.0.0.0/0", what = "HTTPS to Maestro's proxy" }
      "maestro-status-from-vpc" = { port = local.maestro_status_port, cidr = var.vpc_cidr, what = "Maestro status from the VPC" }
    },
    { for c in var.admin_cidrs : "ssh-from-${c}" => { port = 22, cidr = c, what = "SSH from an admin" } },
  )
}

resource "aws_security_group" "control" {
  name        = "${var.name_prefix}-control"
  description = "Platform.X control hosts (apprepo, Beacon)"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name_prefix}-control" }
}

resource "aws_security_group" "web" {
  name        = "${var.name_prefix}-web"
  description = "Platform.X web servers (Maestro)"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name_prefix}-web" }
}

resource "aws_vpc_security_group_ingress_rule" "control" {
  for_each = local.control_rules

  security_group_id = aws_security_group.control.id
  description       = each.value.what
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
  tags              = { Name = "${var.name_prefix}-control-${each.key}" }
}

resource "aws_vpc_security_group_ingress_rule" "web" {
  for_each = local.web_rules

  security_group_id = aws_security_group.web.id
  description       = each.value.what
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
  tags              = { Name = "${var.name_prefix}-web-${each.key}" }
}

# Both kinds of host reach out freely: Debian's mirrors, S3 (control hosts), each other.
resource "aws_vpc_security_group_egress_rule" "all" {
  for_each = {
    control = aws_security_group.control.id
    web     = aws_security_group.web.id
  }

  security_group_id = each.value
  description       = "all outbound"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = { Name = "${var.name_prefix}-${each.key}-egress" }
}

# The load balancer's own group: 80 and 443 in from anywhere, out only to the web servers' same
# ports (its health checks leave through port 80 too).
resource "aws_security_group" "load_balancer" {
  count = var.enable_load_balancer ? 1 : 0

  name        = "${var.name_prefix}-lb"
  description = "Platform.X load balancer in front of the web servers"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name_prefix}-lb" }
}

resource "aws_vpc_security_group_ingress_rule" "load_balancer" {
  for_each = { for name, port in local.proxy_ports : name => port if var.enable_load_balancer }

  security_group_id = aws_security_group.load_balancer[0].id
  description       = "${upper(each.key)} from anywhere"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = "0.0.0.0/0"
  tags              = { Name = "${var.name_prefix}-lb-${each.key}-from-anywhere" }
}

resource "aws_vpc_security_group_egress_rule" "load_balancer_to_web" {
  for_each = { for name, port in local.proxy_ports : name => port if var.enable_load_balancer }

  security_group_id            = aws_security_group.load_balancer[0].id
  description                  = "${upper(each.key)} to the web servers"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.web.id
  tags                         = { Name = "${var.name_prefix}-lb-${each.key}-to-web" }
}

# The control API load balancer's group (several control hosts): apprepo's and Beacon's APIs in
# from admin_cidrs, out only to the control hosts' same ports (its health checks too). It keeps
# the client's address, so the control hosts' own admin_cidrs rules admit what it passes, and
# their VPC rules its health checks.
resource "aws_security_group" "api_load_balancer" {
  count = var.enable_api_load_balancer ? 1 : 0

  name        = "${var.name_prefix}-api-lb"
  description = "Platform.X load balancer in front of the control APIs"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name_prefix}-api-lb" }
}

resource "aws_vpc_security_group_ingress_rule" "api_load_balancer" {
  for_each = var.enable_api_load_balancer ? merge(
    { for c in var.admin_cidrs : "apprepo-api-from-${c}" => { port = local.apprepo_api_port, cidr = c, what = "apprepo API from an admin" } },
    { for c in var.admin_cidrs : "beacon-api-from-${c}" => { port = local.beacon_api_port, cidr = c, what = "Beacon API from an admin" } },
  ) : {}

  security_group_id = aws_security_group.api_load_balancer[0].id
  description       = each.value.what
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
  tags              = { Name = "${var.name_prefix}-api-lb-${each.key}" }
}

resource "aws_vpc_security_group_egress_rule" "api_load_balancer_to_control" {
  for_each = var.enable_api_load_balancer ? { apprepo = local.apprepo_api_port, beacon = local.beacon_api_port } : {}

  security_group_id            = aws_security_group.api_load_balancer[0].id
  description                  = "${each.key} API on the control hosts"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.control.id
  tags                         = { Name = "${var.name_prefix}-api-lb-to-${each.key}" }
}
