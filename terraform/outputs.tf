# outputs.tf: what the next steps need: the Ansible inventory, the addresses `em login` uses,
# and where the bundles are.

output "ansible_inventory" {
  description = "YAML Ansible inventory (groups repository, beacon, webservers, builders). With provision = true the apply writes it to provision_dir/hosts.yml and configures the hosts with it; otherwise save it with: terraform output -raw ansible_inventory > ../ansible/inventories/aws/hosts.yml"
  value       = local.ansible_inventory
}

output "control_hosts" {
  description = "Control hosts (apprepo and Beacon on each): name, instance id, public and private IPv4."
  value       = module.instances.control_hosts
}

output "web_hosts" {
  description = "Web servers (Maestro): name, instance id, public and private IPv4."
  value       = module.instances.web_hosts
}

output "apprepo_url" {
  description = "apprepo's API, for `em login --remote` (reachable from admin_cidrs only): apprepo.<domain> with create_dns_records, else the control API load balancer with several control hosts, else the control host's public IP."
  value       = local.em_urls.apprepo
}

output "beacon_url" {
  description = "The active Beacon's API and status page, for `em login --beacon` (reachable from admin_cidrs only): beacon.<domain> with create_dns_records, else the control API load balancer (which routes to the active Beacon) with several control hosts, else the control host's public IP."
  value       = local.em_urls.beacon
}

output "beacon_urls" {
  description = "Every URL em may reach a Beacon at: beacon_url first, then with several control hosts each one's own Beacon (a standby redirects em to the active one)."
  value       = local.em_urls.beacons
}

output "api_load_balancer_dns_name" {
  description = "DNS name of the load balancer in front of the control hosts' APIs (apprepo on 7070, the active Beacon on 7080), made with two or more control hosts (null with one)."
  value       = local.api_lb_name
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
  description = "Security groups: control, web, lb (with a load balancer, else null) and api_lb (with several control hosts, else null)."
  value = {
    control = module.security_groups.control_security_group_id
    web     = module.security_groups.web_security_group_id
    lb      = module.security_groups.load_balancer_security_group_id
    api_lb  = module.security_groups.api_load_balancer_security_group_id
  }
}

output "ami_id" {
  description = "The AMI new hosts are created from."
  value       = module.instances.ami_id
}

output "provision_dir" {
  description = "Where the provisioning keeps the inventory, the hosts' known_hosts and the cluster's secrets (.secrets/: CA, tokens, em's config): back it up, it is not in the Terraform state. Null with provision = false."
  value       = var.provision ? local.provision_dir : null
}

output "em_setup" {
  description = "How to point em at the cluster once the apply has configured it (provision = true); with provision = false, see ansible/README.md."
  value = var.provision ? join("\n", [
    "install -D -m 0600 ${local.provision_dir}/.secrets/em-config.toml ~/.config/em/config.toml",
    "em status",
  ]) : "provision = false: configure the hosts with scripts/provision or ansible/site.yml (ansible/README.md), then install the em-config.toml it writes"
}
