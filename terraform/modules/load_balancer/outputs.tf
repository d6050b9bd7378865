output "dns_name" {
  description = "The load balancer's DNS name: point the apps' domains here (CNAME or alias)."
  value       = aws_lb.web.dns_name
}

output "zone_id" {
  description = "The load balancer's hosted zone id, for Route 53 alias records."
  value       = aws_lb.web.zone_id
}

output "target_group_arns" {
  description = "The web servers' target groups, by the port they pass: http (80) and https (443)."
  value       = { for name, tg in aws_lb_target_group.web : name => tg.arn }
}

output "ports" {
  description = "The ports passed through to the web servers, by name."
  value       = local.ports
}
