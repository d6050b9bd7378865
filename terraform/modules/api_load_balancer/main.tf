# modules/api_load_balancer: a Network Load Balancer in front of the control APIs, made when
# there are several control hosts: apprepo's API (7070) and Beacon's API (7080) on every one.
#
# Every apprepo serves (they share the bundles bucket), so apprepo's target group holds every
# control host and is health-checked on apprepo's /healthz. Only one Beacon is active at a
# time (it holds the lease; the others stand by and answer /v1/ with a redirect to it), so
# Beacon's target group is health-checked on /v1/health/active, which answers 200 on the
# active Beacon only (503 on a standby): the load balancer routes em's calls to the active
# Beacon, and to the new one within a few checks of a failover.
#
# TLS passes through: each service presents its own certificate (signed by the cluster CA,
# naming this load balancer's DNS name: the inventory adds it), so the load balancer holds
# none, and its health checks speak HTTPS without checking the certificate (as AWS's do).

locals {
  # The APIs passed through, by name: each gets a listener, a target group and its health
  # check path (the path that answers 200 when this target should get requests).
  apis = {
    apprepo = { port = var.apprepo_port, health_path = "/healthz" }
    beacon  = { port = var.beacon_port, health_path = "/v1/health/active" }
  }
  # Only a 200 means "route here": a standby Beacon answers 503 (and 307 on other /v1/ paths).
  health_check_matcher = "200"
  # Checks every 5 s, two in a row to change state: a new active Beacon gets em's calls about
  # 10 s after it takes the lease (a standby redirects em to it meanwhile).
  health_check_interval_s = 5
  health_check_timeout_s  = 4
  health_check_threshold  = 2
  # A removed control host's API calls (event streams of `em deploy`, uploads) get this long
  # to finish; em reconnects a dropped event stream.
  deregistration_delay_s = 30
}

resource "aws_lb" "api" {
  name               = "${var.name_prefix}-api"
  load_balancer_type = "network"
  internal           = false
  security_groups    = [var.security_group_id]
  subnets            = var.subnet_ids
  # A client reaches the active Beacon whichever AZ's address DNS gave it.
  enable_cross_zone_load_balancing = true

  tags = { Name = "${var.name_prefix}-api" }

  lifecycle {
    # Several control hosts are there to survive the loss of one, and of its zone.
    precondition {
      condition     = length(distinct(var.control_azs)) >= 2
      error_message = "the ${length(var.control_azs)} control hosts would all be in ${var.control_azs[0]}: several control hosts need subnets in at least two availability zones (host i goes to subnet_ids[i mod n]), so that losing a zone leaves one."
    }
  }
}

resource "aws_lb_target_group" "api" {
  for_each = local.apis

  name                 = "${var.name_prefix}-${each.key}"
  port                 = each.value.port
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = local.deregistration_delay_s

  health_check {
    protocol            = "HTTPS"
    port                = tostring(each.value.port)
    path                = each.value.health_path
    matcher             = local.health_check_matcher
    interval            = local.health_check_interval_s
    timeout             = local.health_check_timeout_s
    healthy_threshold   = local.health_check_threshold
    unhealthy_threshold = local.health_check_threshold
  }

  tags = { Name = "${var.name_prefix}-${each.key}" }
}

resource "aws_lb_target_group_attachment" "api" {
  for_each = {
    for pair in setproduct(keys(local.apis), range(length(var.control_instance_ids))) :
    "${pair[0]}-${pair[1]}" => { api = pair[0], index = pair[1] }
  }

  target_group_arn = aws_lb_target_group.api[each.value.api].arn
  target_id        = var.control_instance_ids[each.value.index]
  port             = local.apis[each.value.api].port
}

resource "aws_lb_listener" "api" {
  for_each = local.apis

  load_balancer_arn = aws_lb.api.arn
  port              = each.value.port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api[each.key].arn
  }

  tags = { Name = "${var.name_prefix}-${each.key}" }
}
