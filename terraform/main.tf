# main.tf: a Platform.X cluster on AWS. The network, the firewall rules, the bundles bucket
# with the control hosts' role, the hosts, and optionally a load balancer and the cluster's DNS
# records, each a module under modules/. Ansible then configures the hosts from the inventory
# in outputs.tf, which carries the domain and the ACME settings to Beacon.

module "network" {
  source = "./modules/network"

  name_prefix = var.name_prefix
  vpc_cidr    = var.vpc_cidr
  vpc_id      = var.vpc_id
  subnet_ids  = var.subnet_ids
}

module "security_groups" {
  source = "./modules/security_groups"

  name_prefix          = var.name_prefix
  vpc_id               = module.network.vpc_id
  vpc_cidr             = module.network.vpc_cidr
  admin_cidrs          = var.admin_cidrs
  enable_load_balancer = var.enable_load_balancer
}

module "bundles_bucket" {
  source = "./modules/bundles_bucket"

  name_prefix             = var.name_prefix
  bucket_name             = var.bundles_bucket_name
  kms_key_arn             = var.bundles_kms_key_arn
  noncurrent_version_days = var.bundles_noncurrent_version_days
  force_destroy           = var.bundles_force_destroy
}

module "instances" {
  source = "./modules/instances"

  name_prefix                   = var.name_prefix
  ssh_public_key                = var.ssh_public_key
  ami_id                        = var.ami_id
  subnet_ids                    = module.network.subnet_ids
  control_count                 = var.control_count
  web_count                     = var.web_count
  control_instance_type         = var.control_instance_type
  web_instance_type             = var.web_instance_type
  control_root_volume_size      = var.control_root_volume_size
  web_root_volume_size          = var.web_root_volume_size
  control_security_group_id     = module.security_groups.control_security_group_id
  web_security_group_id         = module.security_groups.web_security_group_id
  control_instance_profile_name = module.bundles_bucket.control_instance_profile_name
}

module "load_balancer" {
  source = "./modules/load_balancer"
  count  = var.enable_load_balancer ? 1 : 0

  name_prefix       = var.name_prefix
  vpc_id            = module.network.vpc_id
  subnet_ids        = module.network.subnet_ids
  subnet_azs        = module.network.subnet_azs
  security_group_id = module.security_groups.load_balancer_security_group_id
  web_instance_ids  = module.instances.web_instance_ids
}

module "dns" {
  source = "./modules/dns"
  count  = var.create_dns_records ? 1 : 0

  zone_id        = var.route53_zone_id
  domain         = var.domain
  ttl            = var.dns_ttl
  web_public_ips = [for h in module.instances.web_hosts : h.public_ip]
  api_public_ip  = local.first_control.public_ip
  load_balancer = var.enable_load_balancer ? {
    dns_name = module.load_balancer[0].dns_name
    zone_id  = module.load_balancer[0].zone_id
  } : null
}

locals {
  ports = module.security_groups.ports
  # Beacon runs on the first control host only (there is one Beacon per cluster), and that
  # host's apprepo is the one Beacon reads and Maestros download bundles from; apprepo runs on
  # every control host.
  first_control = module.instances.control_hosts[0]

  ansible_inventory = templatefile("${path.module}/templates/inventory.yml.tftpl", {
    cluster        = var.name_prefix
    region         = var.region
    admin_user     = "admin" # the Debian cloud images' login user
    control_hosts  = module.instances.control_hosts
    beacon_hosts   = [local.first_control]
    web_hosts      = module.instances.web_hosts
    bucket         = module.bundles_bucket.bucket_name
    bucket_region  = module.bundles_bucket.bucket_region
    beacon_address = "${local.first_control.private_ip}:${local.ports.beacon_control}"
    repository_url = "https://${local.first_control.private_ip}:${local.ports.apprepo_api}"
    domain         = var.domain
    acme = {
      directory_url = var.acme_directory_url
      email         = var.acme_email
    }
    # With DNS records, em reaches the APIs by name: the certificates the pki role makes must
    # carry those names, and em's config uses them.
    api_names = var.create_dns_records ? module.dns[0].api_names : null
    em_urls   = local.em_urls
  })

  # The URLs em uses: the APIs' DNS names with create_dns_records, else the first control
  # host's public address.
  em_urls = {
    apprepo = "https://${var.create_dns_records ? module.dns[0].api_names.apprepo : local.first_control.public_ip}:${local.ports.apprepo_api}"
    beacon  = "https://${var.create_dns_records ? module.dns[0].api_names.beacon : local.first_control.public_ip}:${local.ports.beacon_api}"
  }
}
