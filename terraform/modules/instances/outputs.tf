locals {
  control = [for i in range(var.control_count) : aws_instance.host["control-${i + 1}"]]
  web     = [for i in range(var.web_count) : aws_instance.host["web-${i + 1}"]]
}

output "ami_id" {
  description = "The AMI new hosts are created from (existing hosts keep theirs: ignore_changes)."
  value       = local.ami_id
}

output "control_hosts" {
  description = "Control hosts in order: name, instance id, public and private IPv4."
  value = [for h in local.control : {
    name       = h.tags["Name"]
    id         = h.id
    public_ip  = h.public_ip
    private_ip = h.private_ip
  }]
}

output "web_hosts" {
  description = "Web servers in order: name, instance id, public and private IPv4."
  value = [for h in local.web : {
    name       = h.tags["Name"]
    id         = h.id
    public_ip  = h.public_ip
    private_ip = h.private_ip
  }]
}

output "web_instance_ids" {
  description = "Instance ids of the web servers (for the load balancer's targets)."
  value       = [for h in local.web : h.id]
}
