# modules/load_balancer: an Application Load Balancer on port 80 in front of every web server.
#
# Maestro routes by Host header, so the ALB forwards everything to port 80 of every web server
# and Maestro picks the app. The health check asks `GET /` with the target's IP address as the
# Host: no app has that name, so a working Maestro answers with its 404 page. Any answer below
# 500 therefore means "this node's proxy is up", which is what the ALB should know; whether an
# app is healthy is Maestro's business (it routes only to healthy instances). A node whose
# proxy is down refuses the connection or times out and leaves the pool.

resource "aws_lb" "web" {
  name               = "${var.name_prefix}-web"
  load_balancer_type = "application"
  internal           = false
  security_groups    = [var.security_group_id]
  subnets            = var.subnet_ids
  # Malformed headers are dropped here rather than passed on to Maestro and the apps.
  drop_invalid_header_fields = true

  tags = { Name = "${var.name_prefix}-web" }

  lifecycle {
    precondition {
      condition     = length(distinct(var.subnet_azs)) >= 2
      error_message = "an Application Load Balancer needs subnets in at least two availability zones."
    }
  }
}

resource "aws_lb_target_group" "web" {
  name        = "${var.name_prefix}-web"
  port        = 80
  protocol    = "HTTP"
  target_type = "instance"
  vpc_id      = var.vpc_id
  # Maestro's drain_deadline default: a node taken out finishes its requests first.
  deregistration_delay = 30

  health_check {
    path                = "/"
    matcher             = "200-499"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = { Name = "${var.name_prefix}-web" }
}

resource "aws_lb_target_group_attachment" "web" {
  count = length(var.web_instance_ids)

  target_group_arn = aws_lb_target_group.web.arn
  target_id        = var.web_instance_ids[count.index]
  port             = 80
}

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.web.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.web.arn
  }

  tags = { Name = "${var.name_prefix}-web-http" }
}
