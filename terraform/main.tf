# main.tf: a Platform.X cluster on AWS. The network, the firewall rules, the bundles bucket
# with the control hosts' role, the hosts, with several control hosts a load balancer for
# their APIs, and optionally a load balancer for the web servers and the cluster's DNS
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

  enable_api_load_balancer = local.several_control_hosts
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
  architecture                  = var.architecture
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

# Several control hosts: em reaches every apprepo and the active Beacon through one name.
module "api_load_balancer" {
  source = "./modules/api_load_balancer"
  count  = local.several_control_hosts ? 1 : 0

  name_prefix          = var.name_prefix
  vpc_id               = module.network.vpc_id
  subnet_ids           = module.network.subnet_ids
  subnet_azs           = module.network.subnet_azs
  security_group_id    = module.security_groups.api_load_balancer_security_group_id
  control_instance_ids = [for h in module.instances.control_hosts : h.id]
  # The instances module puts host i in subnet i mod n.
  control_azs  = [for i in range(var.control_count) : module.network.subnet_azs[i % length(module.network.subnet_azs)]]
  apprepo_port = local.ports.apprepo_api
  beacon_port  = local.ports.beacon_api
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
  api_load_balancer = local.several_control_hosts ? {
    dns_name = module.api_load_balancer[0].dns_name
    zone_id  = module.api_load_balancer[0].zone_id
  } : null
}

locals {
  ports = module.security_groups.ports
  # Every control host runs apprepo and Beacon. With two or more, one Beacon is active (it
  # holds a lease in the bundles bucket, through apprepo) and the others stand by to take
  # over; the API load balancer sends em to the active one.
  several_control_hosts = var.control_count > 1
  first_control         = module.instances.control_hosts[0]
  # The API load balancer's DNS name, which the services' certificates must name too.
  api_lb_name = local.several_control_hosts ? module.api_load_balancer[0].dns_name : null

  ansible_inventory = templatefile("${path.module}/templates/inventory.yml.tftpl", {
    cluster        = var.name_prefix
    region         = var.region
    admin_user     = "admin" # the Debian cloud images' login user
    control_hosts  = module.instances.control_hosts
    beacon_hosts   = module.instances.control_hosts
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
    # With DNS records or the API load balancer, em reaches the APIs by name: the
    # certificates the pki role makes must carry those names, and em's config uses them.
    api_names = local.api_names
    em_urls   = local.em_urls
  })

  # The names em reaches the APIs by, besides the hosts' addresses: the DNS records, and the
  # API load balancer's own name (null when there is neither).
  api_names = (var.create_dns_records || local.several_control_hosts) ? {
    beacon  = compact([var.create_dns_records ? module.dns[0].api_names.beacon : "", local.api_lb_name == null ? "" : local.api_lb_name])
    apprepo = compact([var.create_dns_records ? module.dns[0].api_names.apprepo : "", local.api_lb_name == null ? "" : local.api_lb_name])
  } : null

  # The URLs em uses: the APIs' DNS names with create_dns_records, else the API load balancer
  # with several control hosts, else the one control host's public address. `beacons` adds
  # every control host's own Beacon URL, which em tries in turn when the first fails.
  api_host = var.create_dns_records ? null : (local.several_control_hosts ? local.api_lb_name : local.first_control.public_ip)
  em_urls = {
    apprepo = "https://${var.create_dns_records ? module.dns[0].api_names.apprepo : local.api_host}:${local.ports.apprepo_api}"
    beacon  = "https://${var.create_dns_records ? module.dns[0].api_names.beacon : local.api_host}:${local.ports.beacon_api}"
    beacons = distinct(concat(
      ["https://${var.create_dns_records ? module.dns[0].api_names.beacon : local.api_host}:${local.ports.beacon_api}"],
      local.several_control_hosts ? [for h in module.instances.control_hosts : "https://${h.public_ip}:${local.ports.beacon_api}"] : [],
    ))
  }
}
