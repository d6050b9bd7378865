variable "zone_id" {
  description = "The public Route 53 hosted zone holding domain."
  type        = string

  # Checked here, where it is needed: the root's variables are validated one by one.
  validation {
    condition     = var.zone_id != null
    error_message = "create_dns_records is true but route53_zone_id is not set: name the public hosted zone that holds domain."
  }
}

variable "domain" {
  description = "The cluster's domain: apps are <app>.<domain>."
  type        = string
}

variable "load_balancer" {
  description = "The load balancer in front of the web servers (dns_name, zone_id), or null to point the apps' names at web_public_ips."
  type = object({
    dns_name = string
    zone_id  = string
  })
  default = null
}

variable "web_public_ips" {
  description = "The web servers' public IPv4 addresses, used without a load balancer."
  type        = list(string)
}

variable "api_public_ip" {
  description = "The public IPv4 address of the control host serving Beacon's and apprepo's APIs, used without an API load balancer."
  type        = string
}

variable "api_load_balancer" {
  description = "The control API load balancer (dns_name, zone_id) of a cluster with several control hosts, or null to point the API names at api_public_ip."
  type = object({
    dns_name = string
    zone_id  = string
  })
  default = null
}

variable "api_labels" {
  description = "The label under domain of each API's name, by service."
  type        = map(string)
  default = {
    beacon  = "beacon"
    apprepo = "apprepo"
  }
}

variable "ttl" {
  description = "TTL in seconds of the A records (alias records have none of their own)."
  type        = number
}
