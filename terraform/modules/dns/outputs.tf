output "app_names" {
  description = "The names the apps are served under: the wildcard and the bare domain."
  value       = values(local.app_names)
}

output "api_names" {
  description = "The APIs' names, by service (beacon, apprepo)."
  value       = local.api_names
}
