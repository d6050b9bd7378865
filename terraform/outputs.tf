# outputs.tf: what the next steps need: the Ansible inventory, the addresses `em login` uses,
# and where the bundles are.

output "ansible_inventory" {
  description = "YAML Ansible inventory (groups repository, beacon, webservers, builders). Save it with: terraform output -raw ansible_inventory > ../ansible/inventories/aws/hosts.yml"
  value       = local.ansible_inventory
}

output "control_hosts" {
  description = "Control hosts (apprepo; Beacon on the first): name, instance id, public and private IPv4."
  value       = module.instances.control_hosts
}

output "web_hosts" {
  description = "Web servers (Maestro): name, instance id, public and private IPv4."
  value       = module.instances.web_hosts
}

output "apprepo_url" {
  description = "apprepo's API on the first control host, for `em login --remote` (reachable from admin_cidrs only): apprepo.<domain> with create_dns_records, else the host's public IP."
  value       = local.em_urls.apprepo
}

output "beacon_url" {
  description = "Beacon's API and status page, for `em login --beacon` (reachable from admin_cidrs only): beacon.<domain> with create_dns_records, else the host's public IP."
  value       = local.em_urls.beacon
}

output "domain" {
  description = "The cluster's domain: apps are served as <app>.<domain>."
  value       = var.domain
}

output "dns_records" {
  description = "The names create_dns_records made (null without it): apps (*.<domain> and <domain>) and apis (beacon, apprepo)."
  value = var.create_dns_records ? {
    apps = module.dns[0].app_names
    apis = module.dns[0].api_names
  } : null
}

output "load_balancer_dns_name" {
  description = "DNS name of the Network Load Balancer in front of the web servers (null without enable_load_balancer): without create_dns_records, point *.<domain> here (CNAME or Route 53 alias)."
  value       = var.enable_load_balancer ? module.load_balancer[0].dns_name : null
}

output "load_balancer_zone_id" {
  description = "The load balancer's Route 53 hosted zone id, for alias records made elsewhere (null without enable_load_balancer)."
  value       = var.enable_load_balancer ? module.load_balancer[0].zone_id : null
}

output "acme_directory_url" {
  description = "The ACME directory Beacon orders certificates from (empty: ACME off)."
  value       = var.acme_directory_url
}

output "bundles_bucket" {
  description = "The S3 bucket apprepo stores bundles in, and its region."
  value = {
    name   = module.bundles_bucket.bucket_name
    arn    = module.bundles_bucket.bucket_arn
    region = module.bundles_bucket.bucket_region
  }
}

output "control_role_arn" {
  description = "IAM role of the control hosts (read and write on the bundles bucket only)."
  value       = module.bundles_bucket.control_role_arn
}

output "vpc_id" {
  description = "The VPC the cluster is in."
  value       = module.network.vpc_id
}

output "subnet_ids" {
  description = "The public subnets the hosts are in."
  value       = module.network.subnet_ids
}

output "security_group_ids" {
  description = "Security groups: control, web and (with a load balancer) lb."
  value = {
    control = module.security_groups.control_security_group_id
    web     = module.security_groups.web_security_group_id
    lb      = module.security_groups.load_balancer_security_group_id
  }
}

output "ami_id" {
  description = "The AMI new hosts are created from."
  value       = module.instances.ami_id
}
