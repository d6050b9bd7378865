# modules/load_balancer: a Network Load Balancer passing TCP 80 and 443 through to every web
# server.
#
# TLS terminates on Maestro, which holds each app's certificate (from ACME, or installed by
# hand) and routes by Host or SNI; the load balancer never sees a certificate or a request, it
# only moves TCP connections. Instance targets keep the client's address as the source, so
# Maestro's access log and its per-client limits see real clients, with no proxy header.
#
# Both target groups are health-checked with `GET /` over plain HTTP on port 80, which needs
# no certificate: the check's Host is the target's IP address, which no app is named after,
# so a working Maestro answers with its 404 page (or a redirect to HTTPS). Any answer below
# 500 means "this node's proxy is up", which is what the load balancer should know; whether an
# app is healthy is Maestro's business (it routes only to healthy instances). Port 443 is
# checked through port 80 as well: one Maestro process serves both.

locals {
  # The ports passed through, by name: each gets a listener and a target group.
  ports = { http = 80, https = 443 }
  # The health check's port and its answers meaning "the proxy is up".
  health_check_port    = 80
  health_check_matcher = "200-499"
  # Maestro's drain_deadline default: a node taken out finishes its connections first.
  deregistration_delay_s = 30
}

resource "aws_lb" "web" {
  #checkov:skip=CKV2_AWS_20:a network load balancer passes TCP 80 through; Maestro itself redirects HTTP to HTTPS
  name               = "${var.name_prefix}-web"
  load_balancer_type = "network"
  internal           = false
  security_groups    = [var.security_group_id]
  subnets            = var.subnet_ids
  # A client reaches every web server whichever AZ's address DNS gave it.
  enable_cross_zone_load_balancing = true

  tags = { Name = "${var.name_prefix}-web" }

  lifecycle {
    precondition {
      condition     = length(distinct(var.subnet_azs)) >= 2
      error_message = "the load balancer needs subnets in at least two availability zones."
    }
  }
}

resource "aws_lb_target_group" "web" {
  for_each = local.ports

  name                 = "${var.name_prefix}-web-${each.key}"
  port                 = each.value
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = local.deregistration_delay_s

  health_check {
    protocol            = "HTTP"
    port                = tostring(local.health_check_port)
    path                = "/"
    matcher             = local.health_check_matcher
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = { Name = "${var.name_prefix}-web-${each.key}" }
}

resource "aws_lb_target_group_attachment" "web" {
  for_each = {
    for pair in setproduct(keys(local.ports), range(length(var.web_instance_ids))) :
    "${pair[0]}-${pair[1]}" => { port_name = pair[0], index = pair[1] }
  }

  target_group_arn = aws_lb_target_group.web[each.value.port_name].arn
  target_id        = var.web_instance_ids[each.value.index]
  port             = local.ports[each.value.port_name]
}

resource "aws_lb_listener" "web" {
  for_each = local.ports

  load_balancer_arn = aws_lb.web.arn
  port              = each.value
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.web[each.key].arn
  }

  tags = { Name = "${var.name_prefix}-web-${each.key}" }
}
