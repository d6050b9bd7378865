# modules/dns: the cluster's names in a Route 53 hosted zone.
#
#   *.<domain>, <domain>                 the apps (Maestro on the web servers): an alias to the
#                                        load balancer, or without one an A record holding every
#                                        web server's public IP (round robin)
#   beacon.<domain>, apprepo.<domain>    the APIs: with several control hosts an alias to the
#                                        control API load balancer (which routes Beacon's name
#                                        to the active Beacon), else an A record to the one
#                                        control host
#
# A record of its own wins over the wildcard, so the API names stay the control host's even
# though *.<domain> covers them (an app named beacon or apprepo is not reachable under the
# cluster domain; give it a domain of its own).

data "aws_route53_zone" "cluster" {
  zone_id = var.zone_id

  lifecycle {
    postcondition {
      condition     = !self.private_zone
      error_message = "route53_zone_id ${var.zone_id} is a private hosted zone: the CA and the apps' users resolve the domain on the internet, so it needs a public one."
    }
    postcondition {
      # Route 53 names end with a dot; the domain is the zone itself or a name under it.
      condition = (
        var.domain == trimsuffix(self.name, ".") ||
        endswith(var.domain, ".${trimsuffix(self.name, ".")}")
      )
      error_message = "domain ${var.domain} is not inside the hosted zone ${trimsuffix(self.name, ".")} (route53_zone_id ${var.zone_id})."
    }
  }
}

locals {
  app_names = {
    wildcard = "*.${var.domain}"
    bare     = var.domain
  }
  api_names = {
    for service, label in var.api_labels : service => "${label}.${var.domain}"
  }
}

# The apps through the load balancer: alias records cost nothing per query and follow the load
# balancer's addresses as AWS changes them.
resource "aws_route53_record" "apps_alias" {
  for_each = { for key, name in local.app_names : key => name if var.load_balancer != null }

  zone_id = data.aws_route53_zone.cluster.zone_id
  name    = each.value
  type    = "A"

  alias {
    name                   = var.load_balancer.dns_name
    zone_id                = var.load_balancer.zone_id
    evaluate_target_health = true
  }
}

# Without a load balancer: every web server's public IP, so a client tries another when one is
# down. The addresses change when an instance is stopped and started; apply again then.
resource "aws_route53_record" "apps_direct" {
  #checkov:skip=CKV2_AWS_23:the records hold the web servers' public IPs, which checkov cannot trace to their instances
  for_each = { for key, name in local.app_names : key => name if var.load_balancer == null }

  zone_id = data.aws_route53_zone.cluster.zone_id
  name    = each.value
  type    = "A"
  ttl     = var.ttl
  records = var.web_public_ips
}

# Several control hosts: the API names follow the control API load balancer.
resource "aws_route53_record" "api_alias" {
  for_each = { for service, name in local.api_names : service => name if var.api_load_balancer != null }

  zone_id = data.aws_route53_zone.cluster.zone_id
  name    = each.value
  type    = "A"

  alias {
    name                   = var.api_load_balancer.dns_name
    zone_id                = var.api_load_balancer.zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "api" {
  #checkov:skip=CKV2_AWS_23:the record holds the control host's public IP, which checkov cannot trace to its instance
  for_each = { for service, name in local.api_names : service => name if var.api_load_balancer == null }

  zone_id = data.aws_route53_zone.cluster.zone_id
  name    = each.value
  type    = "A"
  ttl     = var.ttl
  records = [var.api_public_ip]
}
