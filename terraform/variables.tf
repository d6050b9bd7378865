# variables.tf: everything a user may set, with the defaults a small cluster starts from.
# Only `domain` and `ssh_public_key` have no default; `admin_cidrs` is worth setting too (see
# README.md).

# --- Where and what it is called -------------------------------------------------------------

variable "region" {
  description = "AWS region to build the cluster in, e.g. eu-west-1."
  type        = string
  default     = "eu-west-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]+$", var.region))
    error_message = "region must be an AWS region name such as eu-west-1 or us-east-1."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name and value of the Cluster tag: a lowercase DNS label of at most 24 characters (bucket, load balancer and target group names are built from it and have length limits)."
  type        = string
  default     = "platformx"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$", var.name_prefix))
    error_message = "name_prefix must be 1-24 characters of a-z, 0-9 and '-', start with a letter and not end with '-'."
  }
}

variable "tags" {
  description = "Extra tags for every resource (Project, Cluster and ManagedBy are always set)."
  type        = map(string)
  default     = {}
}

# --- Domain, DNS and certificates -------------------------------------------------------------

variable "domain" {
  description = "The cluster's domain: apps are served as <app>.<domain> (Beacon's `domain`), and with create_dns_records the APIs as beacon.<domain> and apprepo.<domain>. A DNS name you control, e.g. apps.example.com."
  type        = string

  validation {
    # At most 189 characters: <app>.<domain> with the longest app name (63) fits DNS's 253.
    condition = (
      length(var.domain) <= 189 &&
      can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", var.domain))
    )
    error_message = "domain must be a lowercase DNS name of at least two labels and at most 189 characters, such as apps.example.com (no trailing dot, no wildcard, no IP address)."
  }

  validation {
    # The special-use names of RFC 6761 and 6762, and .internal: no public CA certifies them.
    condition     = !can(regex("(^|\\.)(local(host|domain)?|internal|invalid|test|example)$", var.domain))
    error_message = "domain must be under a public top-level domain: special-use names (.local, .test, .example, .invalid, .internal, the loopback name) cannot get certificates from a public CA."
  }
}

variable "create_dns_records" {
  description = "Create the cluster's DNS records in the Route 53 hosted zone route53_zone_id: *.<domain> and <domain> to the load balancer (or, without one, to every web server's public IP), beacon.<domain> and apprepo.<domain> to the first control host."
  type        = bool
  default     = false
}

variable "route53_zone_id" {
  description = "The public Route 53 hosted zone that holds domain (the zone of domain itself or of a parent), for create_dns_records."
  type        = string
  default     = null

  validation {
    condition     = var.route53_zone_id == null || can(regex("^[A-Z0-9]{1,32}$", var.route53_zone_id))
    error_message = "route53_zone_id must be a Route 53 hosted zone id: up to 32 capital letters and digits, such as Z0123456789ABCDEFGHIJ."
  }
}

variable "dns_ttl" {
  description = "TTL in seconds of the A records made without a load balancer (alias records to the load balancer have none of their own)."
  type        = number
  default     = 300

  validation {
    condition     = var.dns_ttl >= 30 && var.dns_ttl <= 86400 && floor(var.dns_ttl) == var.dns_ttl
    error_message = "dns_ttl must be a whole number of seconds from 30 to 86400."
  }
}

variable "acme_directory_url" {
  description = "Directory URL of the ACME CA that Beacon orders the apps' certificates from. Default: Let's Encrypt production; Let's Encrypt staging (untrusted certificates, generous rate limits) is https://acme-staging-v02.api.letsencrypt.org/directory. Empty: no ACME, Maestro serves HTTP only (or the certificates you install)."
  type        = string
  default     = "https://acme-v02.api.letsencrypt.org/directory"

  validation {
    condition     = var.acme_directory_url == "" || (length(var.acme_directory_url) <= 2048 && can(regex("^https://[^\\s/?#]+(/[^\\s]*)?$", var.acme_directory_url)))
    error_message = "acme_directory_url must be an https:// URL of at most 2048 characters (an ACME directory), or empty to turn ACME off."
  }
}

variable "acme_email" {
  description = "Contact address of the ACME account (the CA may write about problems with it). Empty: an account without contact."
  type        = string
  default     = ""

  validation {
    condition     = var.acme_email == "" || (length(var.acme_email) <= 254 && can(regex("^[^@\\s]+@[a-z0-9-]+(\\.[a-z0-9-]+)+$", lower(var.acme_email))))
    error_message = "acme_email must be one email address such as ops@example.com (at most 254 characters), or empty."
  }
}

# --- Network ----------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR block of the VPC created when vpc_id is not set (a /16 to /24); the two public subnets take its first two /(n+4) blocks."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition = (
      can(cidrhost(var.vpc_cidr, 0)) &&
      can(regex("^[0-9.]+/[0-9]+$", var.vpc_cidr)) &&
      try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 24, false)
    )
    error_message = "vpc_cidr must be an IPv4 CIDR block from /16 to /24, e.g. 10.42.0.0/16."
  }
}

variable "vpc_id" {
  description = "An existing VPC to build in instead of creating one; then subnet_ids must be set too."
  type        = string
  default     = null

  validation {
    condition     = var.vpc_id == null || can(regex("^vpc-[0-9a-f]{8,17}$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "With vpc_id: public subnets (a route to an internet gateway) of that VPC to put the instances in, round robin; at least two in different AZs when enable_load_balancer is true."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", id))])
    error_message = "subnet_ids must look like subnet-0123456789abcdef0."
  }
}

variable "admin_cidrs" {
  description = "CIDR blocks (your workstation's address as x.x.x.x/32) that may reach SSH (22) on every host and the apprepo (7070) and Beacon (7080) APIs on the control hosts. Empty: nothing outside the VPC reaches them."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0)) && can(regex("^[0-9.]+/[0-9]+$", c))])
    error_message = "admin_cidrs must be IPv4 CIDR blocks such as 203.0.113.7/32."
  }
}

# --- Instances --------------------------------------------------------------------------------

variable "ssh_public_key" {
  description = "OpenSSH public key (the line in ~/.ssh/id_ed25519.pub) installed for the admin user on every host."
  type        = string

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*( .*)?$", trimspace(var.ssh_public_key)))
    error_message = "ssh_public_key must be one OpenSSH public key line (ssh-ed25519, ssh-rsa or ecdsa-sha2-*)."
  }
}

variable "ami_id" {
  description = "AMI for every host. Default: the newest official Debian 12 amd64 AMI (owner 136693071363, name debian-12-amd64-*), looked up at plan time."
  type        = string
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "control_count" {
  description = "Control hosts, each running apprepo and Beacon, spread over the subnets' availability zones. Two or more give failover: one Beacon is active and the others take over within seconds when it is lost, every apprepo serves, and a load balancer in front of their APIs sends em to them (about 20 USD a month more). One is the smallest cluster, with no failover."
  type        = number
  default     = 1

  validation {
    condition     = var.control_count >= 1 && var.control_count <= 5 && floor(var.control_count) == var.control_count
    error_message = "control_count must be a whole number from 1 to 5."
  }
}

variable "web_count" {
  description = "Web servers, each running Maestro and every app's instances."
  type        = number
  default     = 2

  validation {
    condition     = var.web_count >= 1 && var.web_count <= 50 && floor(var.web_count) == var.web_count
    error_message = "web_count must be a whole number from 1 to 50."
  }
}

variable "architecture" {
  description = "The hosts' CPU architecture: x86_64, or arm64 (Graviton; set instance types of that architecture, such as t4g.small). It picks the Debian 12 AMI and, with release_version, the release tarball (aarch64-unknown-linux-gnu for arm64)."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "control_instance_type" {
  description = "EC2 instance type of the control hosts (apprepo and Beacon are small Rust services)."
  type        = string
  default     = "t3.small"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.control_instance_type))
    error_message = "control_instance_type must be an instance type such as t3.small."
  }
}

variable "web_instance_type" {
  description = "EC2 instance type of the web servers (Maestro plus the apps: size it for the apps)."
  type        = string
  default     = "t3.small"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.web_instance_type))
    error_message = "web_instance_type must be an instance type such as t3.small."
  }
}

variable "control_root_volume_size" {
  description = "Root volume of each control host, GiB (gp3, encrypted). apprepo spools each upload there (up to 2 GiB by default) before it goes to S3."
  type        = number
  default     = 20

  validation {
    condition     = var.control_root_volume_size >= 8 && var.control_root_volume_size <= 16384 && floor(var.control_root_volume_size) == var.control_root_volume_size
    error_message = "control_root_volume_size must be a whole number of GiB from 8 to 16384."
  }
}

variable "web_root_volume_size" {
  description = "Root volume of each web server, GiB (gp3, encrypted): unpacked releases and logs live there."
  type        = number
  default     = 20

  validation {
    condition     = var.web_root_volume_size >= 8 && var.web_root_volume_size <= 16384 && floor(var.web_root_volume_size) == var.web_root_volume_size
    error_message = "web_root_volume_size must be a whole number of GiB from 8 to 16384."
  }
}

# --- Bundles bucket ---------------------------------------------------------------------------

variable "bundles_bucket_name" {
  description = "Name of the S3 bucket apprepo stores bundles and releases in. Default: a unique name starting with <name_prefix>-bundles-."
  type        = string
  default     = null

  validation {
    condition = var.bundles_bucket_name == null || (
      can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bundles_bucket_name)) &&
      !can(regex("\\.\\.|^[0-9.]+$|^xn--|-s3alias$", var.bundles_bucket_name))
    )
    error_message = "bundles_bucket_name must follow S3's bucket naming rules (3-63 characters of a-z, 0-9, '.', '-')."
  }
}

variable "bundles_kms_key_arn" {
  description = "KMS key to encrypt bundles with (SSE-KMS, with an S3 bucket key). Default: SSE-S3 (AES256), which costs nothing."
  type        = string
  default     = null

  validation {
    condition     = var.bundles_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.bundles_kms_key_arn))
    error_message = "bundles_kms_key_arn must be a KMS key ARN (arn:aws:kms:...)."
  }
}

variable "bundles_noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept before S3 expires it. Bundles and releases are immutable, so only the app pointers (apps/<app>/app.json) make such versions."
  type        = number
  default     = 30

  validation {
    condition     = var.bundles_noncurrent_version_days >= 1 && var.bundles_noncurrent_version_days <= 3650 && floor(var.bundles_noncurrent_version_days) == var.bundles_noncurrent_version_days
    error_message = "bundles_noncurrent_version_days must be a whole number from 1 to 3650."
  }
}

variable "bundles_force_destroy" {
  description = "Let `terraform destroy` delete the bundles bucket with everything in it. Off by default, so a destroy never deletes deployed releases unless asked to."
  type        = bool
  default     = false
}

# --- Load balancer ----------------------------------------------------------------------------

variable "enable_load_balancer" {
  description = "Put a Network Load Balancer in front of the web servers, passing TCP 80 and 443 through to Maestro, which terminates TLS (about 20 USD a month more; see README.md). Without it, DNS points at the web servers' addresses."
  type        = bool
  default     = false
}

# --- Provisioning: Terraform configures the hosts (provision.tf) --------------------------------

variable "provision" {
  description = "Configure the hosts at the end of the apply: scripts/provision runs ansible/site.yml over SSH with the inventory Terraform rendered and the hosts' keys from their console output (see provision.tf). Off: Terraform only makes the machines, and the ansible_inventory output is for running Ansible yourself."
  type        = bool
  default     = true
}

variable "release_tarball" {
  description = "Release tarball (from scripts/dist) on the machine running Terraform, installed on every host. Empty: release_version, else the binaries in ../target/release (cargo build --release). Changing it (or the file) rolls the web servers to the new release one at a time."
  type        = string
  default     = ""

  validation {
    condition     = var.release_tarball == "" || can(regex("\\.(tar\\.gz|tgz|tar\\.xz)$", var.release_tarball))
    error_message = "release_tarball must name a .tar.gz, .tgz or .tar.xz release tarball from scripts/dist, or be empty."
  }
}

variable "release_version" {
  description = "A published release's version (e.g. 1.2.0), installed on every host: its tarball, release_url/platformx-<version>-x86_64-unknown-linux-gnu.tar.gz, is fetched once onto the machine running Terraform and checked against the .sha256 published beside it. Not with release_tarball. Changing it rolls the hosts to that version, the web servers one at a time."
  type        = string
  default     = ""

  validation {
    condition     = var.release_version == "" || can(regex("^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$", var.release_version))
    error_message = "release_version must be a version such as 1.2.0 (up to 64 letters, digits, dots, dashes, pluses and underscores), or be empty."
  }
}

variable "release_url" {
  description = "Where the release tarballs of scripts/dist and their .sha256 files are published (https://, http:// or file://), for release_version."
  type        = string
  default     = ""

  validation {
    condition     = var.release_url == "" || can(regex("^(https?|file)://[^[:space:]]+$", var.release_url))
    error_message = "release_url must be an https://, http:// or file:// URL, or be empty."
  }
}

variable "ssh_private_key_file" {
  description = "Private key of ssh_public_key, for Ansible's SSH logins as admin. Empty: ssh-agent and ~/.ssh, as ssh finds them."
  type        = string
  default     = ""
}

variable "provision_web_serial" {
  description = "Web servers configured at a time by the provisioning run: a count (default 1: a new release restarts one Maestro at a time while the others serve) or a percentage such as 50%."
  type        = string
  default     = "1"

  validation {
    condition     = can(regex("^([1-9][0-9]{0,3}|[1-9][0-9]?%|100%)$", var.provision_web_serial))
    error_message = "provision_web_serial must be a count from 1 to 9999 or a percentage from 1% to 100%."
  }
}

variable "provision_command" {
  description = "The program the provisioning step runs, as a list (the arguments of scripts/provision follow it). Empty: scripts/provision beside this directory. For wrappers and tests; a real cluster leaves it empty."
  type        = list(string)
  default     = []
}
