output "dns_name" {
  description = "The load balancer's DNS name: point the apps' domains here (CNAME or alias)."
  value       = aws_lb.web.dns_name
}

output "zone_id" {
  description = "The load balancer's hosted zone id, for Route 53 alias records."
  value       = aws_lb.web.zone_id
}

output "target_group_arn" {
  description = "The web servers' target group."
  value       = aws_lb_target_group.web.arn
}
