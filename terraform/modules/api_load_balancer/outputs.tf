output "dns_name" {
  description = "The API load balancer's DNS name: em reaches apprepo and the active Beacon here."
  value       = aws_lb.api.dns_name
}

output "zone_id" {
  description = "The API load balancer's hosted zone id, for Route 53 alias records."
  value       = aws_lb.api.zone_id
}

output "target_group_arns" {
  description = "The target groups, by API: apprepo and beacon."
  value       = { for name, tg in aws_lb_target_group.api : name => tg.arn }
}
