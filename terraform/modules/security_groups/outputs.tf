output "control_security_group_id" {
  description = "Group of the control hosts."
  value       = aws_security_group.control.id
}

output "web_security_group_id" {
  description = "Group of the web servers."
  value       = aws_security_group.web.id
}

output "load_balancer_security_group_id" {
  description = "Group of the load balancer (null without one)."
  value       = var.enable_load_balancer ? aws_security_group.load_balancer[0].id : null
}

output "api_load_balancer_security_group_id" {
  description = "Group of the control API load balancer (null without one)."
  value       = var.enable_api_load_balancer ? aws_security_group.api_load_balancer[0].id : null
}

output "ports" {
  description = "The service ports the rules open."
  value = {
    apprepo_api    = local.apprepo_api_port
    beacon_api     = local.beacon_api_port
    beacon_control = local.beacon_control_port
    maestro_status = local.maestro_status_port
  }
}
